"""transformers' AutoModelForCausalLM / AutoTokenizer on a foe checkpoint give the bare model's logits."""

from __future__ import annotations

import pytest
import torch

import foe.hf  # noqa: F401  (registers model_type "foe")
from foe.model.checkpoint import save_checkpoint
from foe.tokenizer import save_tokenizer, train_bpe
from tests.conftest import build, tiny


@pytest.mark.parametrize("arch", ["moe", "foe"])
def test_auto_classes_match_bare_model(tmp_path, arch: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = build(tiny(arch), seed=11)
    tok = train_bpe(["The quick brown fox jumps over the lazy dog. " * 30], 320)
    save_checkpoint(model, tmp_path)
    save_tokenizer(tok, tmp_path)

    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    assert type(hf).__name__ == "FoEForCausalLM"
    text = ["The lazy fox jumps over the quick dog.", "A brown dog."]
    ids = [tok.encode(t).ids for t in text]
    assert [hf_tok(t)["input_ids"] for t in text] == ids

    with torch.no_grad():
        for row in ids:
            x = torch.tensor([row])
            torch.testing.assert_close(hf(x).logits, model(x).logits, rtol=0, atol=0)
        # lm-eval batches with right padding: the padded rows give the same logits where they are real
        batch = hf_tok(text, padding=True, return_tensors="pt")
        assert hf_tok.padding_side == "right"
        padded = hf(**batch).logits
        for r, row in enumerate(ids):
            torch.testing.assert_close(padded[r, :len(row)], model(torch.tensor([row])).logits[0],
                                       rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="right padding"):
            hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].flip(-1))
    out = hf.generate(torch.tensor([ids[0]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, len(ids[0]) + 4)
    assert hf.generation_config.top_k is None  # config.json's top_k is experts per token, not sampling


def test_float64_checkpoint_loads_and_runs_in_float64(tmp_path) -> None:
    """from_pretrained keeps a float64 checkpoint in float64 (transformers' dtype="auto"), and the rotary
    tables, which its meta-device construction never materialises, follow the model's dtype."""
    from transformers import AutoModelForCausalLM
    model = build(tiny("foe"), seed=3).double()
    save_checkpoint(model, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.tensor([[5, 9, 2, 200, 17, 3]])
    with torch.no_grad():
        logits = hf(x).logits
        assert logits.dtype == torch.float64
        torch.testing.assert_close(logits, model(x).logits, rtol=0, atol=1e-12)
