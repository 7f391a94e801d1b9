import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from finetune.flops import attention_length, flops_per_token, gpu_kind, peak_flops, shape_from_config, shape_of


def _config(tied: bool) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tied,
    )  # fmt: skip


@pytest.mark.parametrize("tied", [True, False])
def test_shape_counts_matrix_parameters(tied):
    config = _config(tied)
    model = LlamaForCausalLM(config)
    shape = shape_of(model)
    total = sum(p.numel() for p in model.parameters())
    assert shape.params == (total if tied else total - 320 * 64)
    assert shape.layers == 3 and shape.query_width == 64
    assert shape_from_config(config).params == shape.params


def test_attention_length_keeps_documents_apart():
    assert attention_length([4, 4]) == 4.0
    assert attention_length([6, 2]) == (36 + 4) / 8
    assert attention_length([]) == 0.0


def test_formulas():
    from finetune.flops import ModelShape

    shape = ModelShape(params=1000, layers=2, query_width=8)
    full, full_hw = flops_per_token(shape, "full", 10.0)
    assert full == full_hw == 6000 + 12 * 2 * 8 * 10
    lora, lora_hw = flops_per_token(shape, "lora", 10.0, adapter_params=50, recompute=True)
    assert lora == 4000 + 300 + 1920
    assert lora_hw == lora + 2000 + 640
    with pytest.raises(ValueError):
        flops_per_token(shape, "dpo", 1.0)


def test_peaks_by_device_name():
    assert gpu_kind("NVIDIA H100 80GB HBM3") == "h100-sxm"
    assert gpu_kind("NVIDIA H100 PCIe") == "h100-pcie"
    assert gpu_kind("NVIDIA H200") == "h200"
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert peak_flops("AMD EPYC 7B13") is None
