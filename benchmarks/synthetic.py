"""Deterministic synthetic benchmark data: chat rows with a realistic, long-tailed length mix.

Text mixes English-like words and Traditional Chinese, so tokenisers meet both scripts. Lengths
follow a log-normal distribution (many short exchanges, a long tail of long answers) capped at
a maximum, which is what tenants' instruction data usually looks like. The same seed gives the
same rows on every machine.

    python benchmarks/synthetic.py --rows 20000 --out /tmp/chat.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Iterator
from pathlib import Path

_ONSETS = [
    "",
    "b",
    "c",
    "d",
    "f",
    "g",
    "h",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "w",
    "st",
    "tr",
    "pl",
    "ch",
    "sh",
]
_NUCLEI = ["a", "e", "i", "o", "u", "ai", "ea", "io", "ou", "ee"]
_CODAS = ["", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "st", "ck"]
# Common Traditional Chinese characters (frequency-ordered sample).
_HANZI = (
    "的一是不了在人有我他這個們中來上大為和國地到以說時要就出會可也你對生能而子那得於著下自之年過發後作裡用道行所"
    "然家種事成方多經麼去法學如都同現當沒動面起看定天分還進好小部其些主樣理心她本前開但因只從想實日軍者意無力它與長"
    "把機十民第公此已工使情明性知全三又關點正業外將兩高間由問很最重並物手應戰向頭文體政美相見被利什二等產或新己制身"
    "果加西斯月話合回特代內信表化老給世位次度門任常先海通教兒原東聲提立及比員解水名真論處走義各入幾口認條平系氣題活"
    "臺灣資料模型訓練微調語言電腦網路系統服務客戶問題回答請謝謝您好歡迎使用說明功能設定檔案"
)
_PUNCT_EN = [".", ".", ".", ",", ",", "?", "!", ";", ":"]
_PUNCT_ZH = ["。", "。", "，", "，", "？", "！", "；", "、"]


def _lexicon(rng: random.Random, size: int = 20000) -> list[str]:
    words = set()
    while len(words) < size:
        n = rng.choice([1, 1, 2, 2, 2, 3, 3, 4])
        words.add("".join(rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS) for _ in range(n)))
    ordered = sorted(words)
    rng.shuffle(ordered)  # frequency rank independent of spelling
    return ordered


class TextGenerator:
    """English-like and Chinese text with Zipf-distributed word frequencies."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.words = _lexicon(self.rng)
        self._cum = self._zipf_cumulative(len(self.words))
        self._cum_zh = self._zipf_cumulative(len(_HANZI))

    @staticmethod
    def _zipf_cumulative(n: int) -> list[float]:
        total, cum = 0.0, []
        for rank in range(1, n + 1):
            total += 1.0 / rank
            cum.append(total)
        return [c / total for c in cum]

    def _pick(self, cum: list[float]) -> int:
        import bisect

        return min(bisect.bisect_left(cum, self.rng.random()), len(cum) - 1)

    def english(self, n_words: int) -> str:
        out = []
        for i in range(n_words):
            word = self.words[self._pick(self._cum)]
            out.append(word.capitalize() if i == 0 or out[-1][-1] in ".?!" else word)
            if self.rng.random() < 0.08:
                out[-1] += self.rng.choice(_PUNCT_EN)
        return " ".join(out) + "."

    def chinese(self, n_chars: int) -> str:
        out = []
        for _ in range(n_chars):
            out.append(_HANZI[self._pick(self._cum_zh)])
            if self.rng.random() < 0.07:
                out.append(self.rng.choice(_PUNCT_ZH))
        return "".join(out) + "。"

    def passage(self, approx_tokens: int) -> str:
        """Text of roughly ``approx_tokens`` tokens; 60% English, 30% Chinese, 10% mixed."""
        roll = self.rng.random()
        if roll < 0.6:
            return self.english(max(1, int(approx_tokens * 0.75)))
        if roll < 0.9:
            return self.chinese(max(1, int(approx_tokens * 0.9)))
        half = max(1, approx_tokens // 2)
        return self.english(half) + " " + self.chinese(half)

    def length(self, median: float, sigma: float, cap: int) -> int:
        return max(4, min(cap, int(math.exp(self.rng.gauss(math.log(median), sigma)))))


def chat_rows(n: int, seed: int = 0, max_tokens: int = 4096) -> Iterator[dict[str, object]]:
    """``n`` chat rows in messages format with a long-tailed length mix up to ``max_tokens``."""
    gen = TextGenerator(seed)
    for _ in range(n):
        messages: list[dict[str, str]] = []
        if gen.rng.random() < 0.3:
            messages.append({"role": "system", "content": gen.passage(gen.length(30, 0.5, 200))})
        turns = 1 if gen.rng.random() < 0.7 else gen.rng.randint(2, 4)
        budget = gen.length(350, 1.0, max_tokens)
        for _ in range(turns):
            prompt = gen.length(max(8, budget * 0.25 / turns), 0.7, max_tokens // 4)
            answer = gen.length(max(8, budget * 0.75 / turns), 0.6, max_tokens // 2)
            messages.append({"role": "user", "content": gen.passage(prompt)})
            messages.append({"role": "assistant", "content": gen.passage(answer)})
        yield {"messages": messages}


def corpus(n_passages: int, seed: int = 1) -> Iterator[str]:
    """Plain passages for training a tokenizer."""
    gen = TextGenerator(seed)
    for _ in range(n_passages):
        yield gen.passage(gen.length(200, 0.8, 2000))


def write_jsonl(path: Path, rows: Iterator[dict[str, object]]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    n = write_jsonl(args.out, chat_rows(args.rows, args.seed, args.max_tokens))
    print(f"wrote {n} rows to {args.out}")


if __name__ == "__main__":
    main()
