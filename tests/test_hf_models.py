"""Hugging Face / timm models built from configs (nothing is downloaded): convert →
train → save_pretrained → from_pretrained → convert again gives the same state dict and
bit-identical outputs; GPT-2's Conv1D layers run in FP8. Skips when transformers
(timm) is not installed."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch", reason="the Hugging Face tests need torch")
transformers = pytest.importorskip("transformers", reason="transformers is not installed "
                                   "(pip install 'transformers>=4.50,<6')")

import fp8core_torch as T  # noqa: E402
from tests._torch_helpers import pinned_numerics  # noqa: E402,F401

RECIPE = "ROWWISE"


def _llama():
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    return transformers.LlamaForCausalLM(cfg), 2 * 7 + 1, "nn.Linear"


def _gpt2():
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg), 2 * 4 + 1, "Conv1D"


def _convert(model):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="convert_to_fp8")  # nothing may stay behind
        return T.convert_to_fp8(model, recipe=RECIPE)


@pytest.mark.parametrize("make", [_llama, _gpt2], ids=["llama", "gpt2"])
def test_convert_train_save_reload_convert(make, tmp_path):
    torch.manual_seed(0)
    model, n_layers, proj_kind = make()
    model.eval()
    twin = type(model)(model.config)
    twin.load_state_dict(model.state_dict())
    twin.eval()
    keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))

    model = _convert(model)
    report = model.fp8_conversion_report
    print(report)
    assert len(report.converted) == n_layers and not report.skipped
    assert report.fp8_fraction == 1.0
    projections = [r.kind for r in report.converted if r.fqn != "lm_head"]
    assert projections == [proj_kind] * (n_layers - 1)
    if proj_kind == "Conv1D":
        assert type(model.transformer.h[0].attn.c_attn) is T.Conv1DFP8
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == keys

    # the unconverted twin is the oracle: same loss up to FP8 error, not the same bits
    with torch.no_grad():
        fp8_loss = model(ids, labels=ids).loss.item()
        hp_loss = twin(ids, labels=ids).loss.item()
    assert fp8_loss != hp_loss and abs(fp8_loss - hp_loss) < 0.02 * hp_loss

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(2):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[1] < losses[0]

    model.eval()
    with torch.no_grad():
        before = model(ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path)

    reloaded = type(model).from_pretrained(tmp_path)
    reloaded = _convert(reloaded)
    reloaded.eval()
    after_state = reloaded.state_dict()
    assert sorted(after_state) == sorted(state)
    for k, v in state.items():
        assert torch.equal(after_state[k], v), k
    with torch.no_grad():
        after = reloaded(ids).logits
    assert torch.equal(after, before)


def test_timm_vit_converts_and_reports_the_patch_embedding():
    timm = pytest.importorskip("timm", reason="timm is not installed")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              depth=2, embed_dim=64, num_heads=2, num_classes=10)
    with pytest.warns(UserWarning, match=r"'patch_embed.proj' \(nn.Conv2d\)"):
        model = T.convert_to_fp8(model, recipe=RECIPE)
    report = model.fp8_conversion_report
    assert [r.fqn for r in report.skipped] == ["patch_embed.proj"]
    assert len(report.converted) == 2 * 4 + 1          # qkv, proj, fc1, fc2 per block + head
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
