"""The job service: the HTTP API the platform's UI calls, its database and the dispatcher that runs
jobs on a Ray cluster. It sits on top of the engine and imports from it, never the reverse."""
