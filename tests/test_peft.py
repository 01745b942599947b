"""peft integration: ``lora_kernels.peft.fuse_lora`` runs peft's LoRA Linear layers through
``lora_linear`` with the same numbers as peft (forward and gradients), and leaves the cases it
cannot serve on peft's forward, with one warning naming them."""

import copy
import io
import math
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora.layer import Linear as PeftLoraLinear  # noqa: E402

import lora_kernels  # noqa: E402
import lora_kernels.peft as lkpeft  # noqa: E402
from conftest import DEVICE, rel_err, replicate_like_data_parallel  # noqa: E402
from conftest import TOL as DTYPE_TOL  # noqa: E402
from lora_kernels.peft import fuse_lora, unfuse_lora  # noqa: E402

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_LLAMA_LORA = 2 * len(LLAMA_TARGETS)
TOL = 1e-5


def test_imports_the_real_peft():
    # lora_kernels/peft.py must not shadow the peft package for itself (imports are absolute).
    assert lkpeft.__name__ == "lora_kernels.peft"
    assert peft.__name__ == "peft" and not peft.__file__.startswith(lkpeft.__file__.rsplit("/", 1)[0])
    assert lkpeft._PeftLoraLinear is PeftLoraLinear and PeftLoraLinear.__module__ == "peft.tuners.lora.layer"


@pytest.fixture
def spy(monkeypatch):
    """Records (alpha, dropout_p) of every lora_linear call made by the fused forwards."""
    calls = []
    real = lkpeft.lora_linear

    def record(x, weight, bias, A, B, alpha, dropout_p=0.0):
        calls.append((alpha, dropout_p))
        return real(x, weight, bias, A, B, alpha, dropout_p)

    monkeypatch.setattr(lkpeft, "lora_linear", record)
    return calls


def llama(dtype=torch.float32):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def randomize_lora(model):
    """peft initialises B (and DoRA's magnitude) so the adapter starts as a no-op: never test that."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # small enough that fp32 noise stays well under TOL; the LoRA
                p.normal_(0, 0.05)  # term still moves the logits by more than their norm
            elif "lora_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def peft_llama(seed=0, **config):
    torch.manual_seed(seed)
    config = {"r": 8, "lora_alpha": 16, "target_modules": LLAMA_TARGETS, "lora_dropout": 0.0, **config}
    return randomize_lora(get_peft_model(llama(), LoraConfig(**config)))


class BiasNet(torch.nn.Module):
    """Biased linears (Llama has none), one of them in a subclass of nn.Linear when asked."""

    def __init__(self, subclass_base=False):
        super().__init__()
        linear = type("MyLinear", (torch.nn.Linear,), {}) if subclass_base else torch.nn.Linear
        self.up = torch.nn.Linear(24, 40)
        self.mid = linear(40, 40)
        self.down = torch.nn.Linear(40, 24, bias=True)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.mid(torch.relu(self.up(x)))))


def peft_net(seed=0, subclass_base=False, **config):
    torch.manual_seed(seed)
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["up", "mid", "down"], **config}
    return randomize_lora(get_peft_model(BiasNet(subclass_base), LoraConfig(**config)))


def fuse_quietly(model):
    """fuse_lora, asserting it warns about nothing."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = fuse_lora(model)
    mine = [w for w in caught if "lora_kernels" in str(w.message)]
    assert not mine, [str(w.message) for w in mine]
    return report


def fuse_warning(model):
    """fuse_lora, asserting it emits exactly one UserWarning; returns (report, message)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = fuse_lora(model)
    mine = [w for w in caught if "lora_kernels" in str(w.message)]
    assert len(mine) == 1, [str(w.message) for w in mine]
    assert mine[0].category is UserWarning
    return report, str(mine[0].message)


def lora_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PeftLoraLinear)]


def lora_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if "lora_" in n and p.requires_grad}


def assert_grads_match(fused, ref):
    got, want = lora_grads(fused), lora_grads(ref)
    assert got.keys() == want.keys() and want
    for name in want:
        assert got[name] is not None, name
        assert rel_err(got[name], want[name]) < TOL, name


def run_llama(model, ids, **kwargs):
    out = model(input_ids=ids, labels=ids, **kwargs)
    return out.loss, out.logits


# ---------------------------------------------------------------------------------------------
# Same numbers as peft


@pytest.mark.parametrize("use_rslora", [False, True])
def test_llama_matches_peft(spy, backend, use_rslora):
    # Both backends: the PyTorch path and the Triton kernels (interpreter on CPU, CUDA on a GPU).
    model = peft_llama(use_rslora=use_rslora).to(DEVICE)
    ref = copy.deepcopy(model)
    report = fuse_quietly(model)
    assert int(report) == len(report) == len(report.fused) == N_LLAMA_LORA and not report.fallback
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1)).to(DEVICE)

    loss, logits = run_llama(model, ids)
    ref_loss, ref_logits = run_llama(ref, ids)
    assert len(spy) == N_LLAMA_LORA  # every LoRA layer went through lora_linear
    scaling = 16 / math.sqrt(8) if use_rslora else 16 / 8  # rslora is folded into peft's scaling
    assert all(alpha == pytest.approx(scaling) and p == 0.0 for alpha, p in spy)
    assert rel_err(logits, ref_logits) < TOL
    assert rel_err(loss, ref_loss) < TOL
    loss.backward()
    ref_loss.backward()
    assert_grads_match(model, ref)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_biased_base_matches_peft(spy, use_rslora):
    model = peft_net(use_rslora=use_rslora)
    ref = copy.deepcopy(model)
    assert int(fuse_quietly(model)) == 3
    x = torch.randn(5, 7, 24)
    x_ref = x.clone().requires_grad_()
    x.requires_grad_()
    y, y_ref = model(x), ref(x_ref)
    assert len(spy) == 3
    assert rel_err(y, y_ref) < TOL
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    assert_grads_match(model, ref)
    assert rel_err(x.grad, x_ref.grad) < TOL


def test_trainable_base_bias_gets_its_gradient(spy):
    # modules_to_save-style setups train the base too: its weight and bias gradients must match.
    model = peft_net()
    for m in model.modules():
        if isinstance(m, PeftLoraLinear):
            m.base_layer.weight.requires_grad_(True)
            m.base_layer.bias.requires_grad_(True)
    ref = copy.deepcopy(model)
    fuse_quietly(model)
    x = torch.randn(6, 24)
    model(x).square().sum().backward()
    ref(x).square().sum().backward()
    assert len(spy) == 3
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if "base_layer" in name:
            assert rel_err(p.grad, q.grad) < TOL, name


def test_dropout_reaches_lora_linear_in_training_only(spy):
    model = peft_llama(lora_dropout=0.1)
    ref = copy.deepcopy(model)
    fuse_quietly(model)
    ids = torch.randint(0, 128, (2, 12))

    model.train()
    run_llama(model, ids)[0].backward()
    assert len(spy) == N_LLAMA_LORA and all(p == 0.1 for _, p in spy)
    assert all(g is not None and g.abs().sum() > 0 for g in lora_grads(model).values())

    spy.clear()
    model.eval()
    ref.eval()
    loss, logits = run_llama(model, ids)
    ref_loss, ref_logits = run_llama(ref, ids)
    assert len(spy) == N_LLAMA_LORA and all(p == 0.0 for _, p in spy)
    assert rel_err(logits, ref_logits) < TOL and rel_err(loss, ref_loss) < TOL


def test_dropout_follows_the_dropout_modules_own_mode(spy):
    """peft applies lora_dropout as that module's mode says, not its layer's: dropout turned off
    alone in training (for determinism) or on alone at inference (Monte-Carlo dropout)."""
    model = peft_net(lora_dropout=0.5)
    ref = copy.deepcopy(model)
    fuse_quietly(model)
    x = torch.randn(6, 24)
    for m in (model, ref):  # training, every nn.Dropout in eval mode
        m.train()
        for d in m.modules():
            if isinstance(d, torch.nn.Dropout):
                d.eval()
    got = model(x)
    assert len(spy) == 3 and all(p == 0.0 for _, p in spy)
    assert rel_err(got, ref(x)) < TOL

    spy.clear()
    model.eval()
    for d in model.modules():
        if isinstance(d, torch.nn.Dropout):
            d.train()
    model(x)
    assert len(spy) == 3 and all(p == 0.5 for _, p in spy)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_with_dropout_recomputes_the_same_mask(spy, use_reentrant):
    # The recompute must redraw the same dropout seed (checkpoint restores the RNG state).
    model = peft_llama(lora_dropout=0.2)
    fuse_quietly(model)
    ckpt = copy.deepcopy(model)
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(ckpt, "activation_checkpointing_enable"):  # (transformers 5.24's name; the old one goes in v6)
        ckpt.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    ckpt.enable_input_require_grads()
    ids = torch.randint(0, 128, (2, 12))
    losses = []
    for m in (model, ckpt):
        torch.manual_seed(5)
        loss = run_llama(m, ids)[0]
        loss.backward()
        losses.append(loss)
    assert len(spy) == 3 * N_LLAMA_LORA and all(p == 0.2 for _, p in spy)  # forward, forward, recompute
    assert rel_err(losses[1], losses[0]) < TOL
    assert_grads_match(ckpt, model)


# ---------------------------------------------------------------------------------------------
# What stays on peft's path: one warning per fuse_lora call, same numbers as peft


def test_dora_falls_back(spy):
    model = peft_llama(use_dora=True)
    ref = copy.deepcopy(model)
    report, msg = fuse_warning(model)
    assert int(report) == 0
    assert "DoRA" in msg and "model.layers.0.self_attn.q_proj" in msg and "model.layers.1.mlp.down_proj" in msg
    assert sum(len(v) for v in report.fallback.values()) == N_LLAMA_LORA
    ids = torch.randint(0, 128, (2, 12))
    loss, logits = run_llama(model, ids)
    ref_loss, ref_logits = run_llama(ref, ids)
    assert not spy
    assert rel_err(logits, ref_logits) < TOL
    loss.backward()
    ref_loss.backward()
    assert_grads_match(model, ref)


def test_two_active_adapters_fall_back_and_one_adapter_fuses(spy):
    model = peft_llama()
    model.add_adapter("other", LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"]))
    randomize_lora(model)
    model.base_model.set_adapter(["default", "other"])
    ref = copy.deepcopy(model)
    report, msg = fuse_warning(model)
    assert int(report) == 0 and "not exactly one active adapter" in msg and "other" in msg
    ids = torch.randint(0, 128, (2, 12))
    assert rel_err(run_llama(model, ids)[1], run_llama(ref, ids)[1]) < TOL
    assert not spy

    # The patched layers re-check on every call: one adapter again and they fuse.
    for m in (model, ref):
        m.base_model.set_adapter("other")
    assert rel_err(run_llama(model, ids)[1], run_llama(ref, ids)[1]) < TOL
    assert len(spy) == 2  # "other" only has q_proj in each of the two layers
    report, msg = fuse_warning(model)
    assert int(report) == 2 and "has no LoRA weights in this layer" in msg

    # Mixed-batch inference (adapter_names=...) is peft's own forward.
    spy.clear()
    for m in (model, ref):
        m.base_model.set_adapter("default")
        m.eval()
    names = ["default", "other"]
    got = model(input_ids=ids, adapter_names=names).logits
    assert not spy
    assert rel_err(got, ref(input_ids=ids, adapter_names=names).logits) < TOL


def tiny_transformer(arch, bias=False):
    """A one- or two-block random model of a transformers architecture peft users fine-tune (Falcon's
    linears biased if asked)."""
    ids = dict(vocab_size=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    decoder = dict(ids, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                   num_key_value_heads=2)
    T = transformers
    return {
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**decoder)),
        "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**decoder)),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**decoder)),  # (biased q, k, v)
        "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**decoder, head_dim=8)),
        "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(**decoder)),  # (fused qkv_proj, gate_up_proj)
        "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
            **ids, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4)),
        "opt": lambda: T.OPTForCausalLM(T.OPTConfig(
            **ids, hidden_size=32, ffn_dim=48, num_hidden_layers=1, num_attention_heads=4, word_embed_proj_dim=32,
            dropout=0.0)),
        "bloom": lambda: T.BloomForCausalLM(T.BloomConfig(**ids, hidden_size=32, n_layer=1, n_head=4)),
        # GPT-2's projections are Conv1D, weight stored (in, out), which peft marks fan_in_fan_out;
        # Falcon's are FalconLinear, an nn.Linear subclass with nn.Linear's math.
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(
            **ids, n_layer=2, n_embd=32, n_head=2, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
        "falcon": lambda: T.FalconForCausalLM(T.FalconConfig(
            **ids, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, bias=bias)),
        "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(
            **ids, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4, dropout_rate=0.0, decoder_start_token_id=0)),
        "bert": lambda: T.BertForSequenceClassification(T.BertConfig(
            **ids, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
    }[arch]()


ARCHITECTURES = ["llama", "mistral", "qwen2", "gemma2", "phi3", "gpt_neox", "opt", "bloom", "gpt2", "falcon", "t5",
                 "bert"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_transformers_architectures_fuse_every_layer_and_match_float64_peft(spy, backend, arch):
    # Every projection ("all-linear") of each architecture fuses, whatever its base layer class
    # (nn.Linear, GPT-2's Conv1D read transposed, Falcon's FalconLinear); the reference is the
    # unfused model in float64. One base weight trains too: its gradient comes back in its layer's
    # layout (GPT-2's (in, out)).
    torch.manual_seed(0)
    model = tiny_transformer(arch)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", fan_in_fan_out=arch == "gpt2")
    model = randomize_lora(get_peft_model(model, config)).to(DEVICE)
    layers = lora_layers(model)
    name, trained = layers[-1]
    trained.base_layer.weight.requires_grad_(True)
    ref = copy.deepcopy(model).double()
    report = fuse_quietly(model)
    assert sorted(report.fused) == sorted(n for n, _ in layers) and len(layers) >= 4
    g = torch.Generator().manual_seed(1)
    inputs = {"input_ids": torch.randint(1, 64, (2, 9), generator=g)}
    if arch == "t5":
        inputs["decoder_input_ids"] = torch.randint(1, 64, (2, 5), generator=g)
    inputs = {k: v.to(DEVICE) for k, v in inputs.items()}

    logits, ref_logits = model(**inputs).logits, ref(**inputs).logits
    assert len(spy) == len(layers) and all(alpha == 2.0 and p == 0.0 for alpha, p in spy)
    assert rel_err(logits, ref_logits) < TOL
    weights = torch.randn(logits.shape, generator=g).to(DEVICE)
    (logits * weights).sum().backward()
    (ref_logits * weights.double()).sum().backward()
    assert_grads_match(model, ref)
    assert rel_err(trained.base_layer.weight.grad, ref.get_submodule(name).base_layer.weight.grad) < TOL


def test_a_base_bias_held_as_a_buffer_is_read(spy):
    # (a frozen base may keep its bias as a buffer: the fused call must read it, not drop it)
    model = peft_net()
    ref = copy.deepcopy(model)
    mid = model.base_model.model.mid.base_layer
    bias = mid.bias.detach().clone()
    del mid.bias
    mid.register_buffer("bias", bias)
    assert int(fuse_quietly(model)) == 3
    x = torch.randn(5, 24)
    assert rel_err(model(x), ref(x)) < TOL and len(spy) == 3


def test_biased_falcon_linear_runs_peft(spy):
    # FalconLinear adds its bias after the product, and autocast leaves that sum in fp32: peft's
    # output is fp32 where one fused call would return bf16. Biased ones run peft's forward.
    torch.manual_seed(0)
    model = get_peft_model(tiny_transformer("falcon", bias=True), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    model = randomize_lora(model)
    ref = copy.deepcopy(model)
    report, msg = fuse_warning(model)
    assert int(report) == 0 and "FalconLinear base with a bias" in msg
    layer = model.base_model.model.transformer.h[0].self_attention.dense
    x = torch.randn(3, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        assert y.dtype == torch.float32 and torch.equal(y, ref.get_submodule(
            "base_model.model.transformer.h.0.self_attention.dense")(x))
    assert not spy


def test_subclassed_base_lora_bias_and_hooks_fall_back(spy):
    # A base that subclasses nn.Linear (as quantized bases do) is not served; its siblings are.
    model = peft_net(subclass_base=True)
    ref = copy.deepcopy(model)
    report, msg = fuse_warning(model)
    assert int(report) == 2 and "not exactly torch.nn.Linear" in msg and "mid" in msg and "MyLinear" in msg
    assert "up" not in msg.split("->")[-1]
    x = torch.randn(4, 24)
    assert rel_err(model(x), ref(x)) < TOL and len(spy) == 2

    # lora_bias (a bias on lora_B) is peft's path.
    model = peft_net(lora_bias=True)
    ref = copy.deepcopy(model)
    report, msg = fuse_warning(model)
    assert int(report) == 0 and "lora_bias" in msg

    # A hook on a base layer would be skipped by the fused call: that layer runs peft's forward.
    spy.clear()
    model = peft_net()
    seen = []
    model.base_model.model.up.base_layer.register_forward_pre_hook(lambda m, a: seen.append(1))
    report, msg = fuse_warning(model)
    assert report.fused == ["base_model.model.mid", "base_model.model.down"] and "hooks" in msg
    model(x)
    assert seen == [1] and len(spy) == 2

    # So would one on lora_dropout, and global module hooks (calibration, activation statistics),
    # which peft's forward runs on every nn.Linear it calls: then every layer runs peft's forward.
    for where in ("dropout", "global"):
        spy.clear()
        model = peft_net(lora_dropout=0.1).eval()
        ref = copy.deepcopy(model)
        if where == "dropout":
            handle = model.base_model.model.mid.lora_dropout["default"].register_forward_hook(
                lambda m, a, out: out * 3)
            ref.base_model.model.mid.lora_dropout["default"].register_forward_hook(lambda m, a, out: out * 3)
            report = fuse_warning(model)[0]
            assert report.fused == ["base_model.model.up", "base_model.model.down"]
            assert rel_err(model(x), ref(x)) < TOL and len(spy) == 2
        else:
            report = fuse_quietly(model)
            handle = torch.nn.modules.module.register_module_forward_hook(
                lambda m, a, out: out * 3 if isinstance(m, torch.nn.Linear) else None)
            try:
                assert rel_err(model(x), ref(x)) < TOL and not spy
            finally:
                handle.remove()
            assert rel_err(model(x), ref(x)) < TOL and len(spy) == 3  # fused again once it is gone
        handle.remove()


class Tagged(torch.Tensor):
    """An input tensor subclass (as tensor parallelism's DTensor activations are)."""


def test_tensor_subclass_input_runs_peft(spy):
    model = peft_net()
    ref = copy.deepcopy(model)
    fuse_quietly(model)
    x = torch.randn(4, 24)
    assert rel_err(model(x.as_subclass(Tagged)), ref(x)) < TOL and not spy
    assert rel_err(model(x), ref(x)) < TOL and len(spy) == 3


def test_sparse_input_runs_peft(spy):
    """The kernels cannot read a sparse x: peft's own forward takes it, as it would unfused."""
    model = peft_net()
    ref = copy.deepcopy(model)
    fuse_quietly(model)
    x = torch.randn(4, 24) * (torch.rand(4, 24) > 0.5)
    up, ref_up = model.base_model.model.up, ref.base_model.model.up
    assert rel_err(up(x.to_sparse()), ref_up(x)) < TOL and not spy
    assert rel_err(up(x), ref_up(x)) < TOL and len(spy) == 1


def test_save_pretrained_of_a_fused_model_loads_into_peft(tmp_path):
    """docs/usage.md: saving adapters keeps working. A fused model's save_pretrained writes what peft
    reads back into a plain model, with the same outputs."""
    model = peft_net()
    fuse_quietly(model)
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)  # the same base weights as peft_net's; the adapters come from the file
    loaded = peft.PeftModel.from_pretrained(BiasNet(), tmp_path)
    x = torch.randn(4, 24)
    assert not isinstance(loaded.base_model.model.up, lkpeft.FusedLinear)
    assert rel_err(loaded(x), model(x)) < TOL
    torch.manual_seed(0)
    fresh = get_peft_model(BiasNet(), LoraConfig(r=4, lora_alpha=8, target_modules=["up", "mid", "down"]))
    assert rel_err(fresh(x), model(x)) > 1e-2  # (peft's own start: B = 0, so the adapters did matter)


def test_a_model_without_lora_layers_warns():
    with pytest.warns(UserWarning, match="no peft LoRA layers"):
        assert int(fuse_lora(BiasNet())) == 0


def test_merged_and_disabled_adapters_run_peft(spy):
    model = peft_llama()
    ref = copy.deepcopy(model)
    fuse_quietly(model)
    model.eval()
    ref.eval()
    ids = torch.randint(0, 128, (2, 12))
    want = run_llama(ref, ids)[1]

    with model.disable_adapter(), ref.disable_adapter():
        got, base = run_llama(model, ids)[1], run_llama(ref, ids)[1]
    assert not spy and rel_err(got, base) < TOL and rel_err(got, want) > 1e-3

    model.merge_adapter()
    ref.merge_adapter()
    assert rel_err(run_llama(model, ids)[1], run_llama(ref, ids)[1]) < TOL
    assert not spy
    model.unmerge_adapter()
    ref.unmerge_adapter()
    assert rel_err(run_llama(model, ids)[1], want) < TOL
    assert len(spy) == N_LLAMA_LORA


def test_a_non_finite_scaling_runs_peft(spy):
    """A scaling lora_linear refuses (NaN, say, through set_scale) runs peft's forward, which gives
    what peft gives: fusing never changes a layer's result, nor turns it into an error."""
    model, ref = peft_net(), peft_net()
    fuse_quietly(model)
    for m in (model, ref):
        m.base_model.model.mid.scaling["default"] = float("nan")
    x = torch.randn(5, 24)
    got, want = model(x), ref(x)
    assert torch.isnan(want).all() and torch.equal(got.isnan(), want.isnan())
    assert len(spy) == 2  # (up and down still fused)


@pytest.mark.parametrize("mismatch", ["input", "bias"])
def test_dtype_mismatch_errors_as_peft_does(spy, mismatch):
    # Outside autocast F.linear refuses an input (fp32 into a bf16 base) or a base bias (fp32
    # beside a bf16 weight) of another dtype than the weight: the layer runs peft's forward and
    # raises peft's own error, not lora_linear's. Under autocast both run the products in bf16.
    torch.manual_seed(0)
    net = BiasNet()
    if mismatch == "input":
        net = net.to(torch.bfloat16)
    else:
        net.up.weight.data = net.up.weight.data.bfloat16()
    model = randomize_lora(get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["up"])))
    ref = copy.deepcopy(model)
    fuse_quietly(model)
    x = torch.randn(3, 24, dtype=torch.float32 if mismatch == "input" else torch.bfloat16)
    with pytest.raises(RuntimeError) as want:
        ref.base_model.model.up(x)
    with pytest.raises(RuntimeError) as got:
        model.base_model.model.up(x)
    assert str(got.value) == str(want.value) and not spy
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = model.base_model.model.up(x), ref.base_model.model.up(x)
    assert got.dtype == want.dtype == torch.bfloat16 and len(spy) == 1
    assert rel_err(got, want) < 1e-2


class EmbedNet(torch.nn.Module):
    """An embedding and a linear: peft gives the embedding its own LoRA layer class."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(16, 24)
        self.up = torch.nn.Linear(24, 40)

    def forward(self, ids):
        return self.up(self.embed(ids))


def test_other_lora_layer_types_are_named_and_left_to_peft(spy):
    # peft's LoRA Embedding is not a lora.Linear: the warning says so (not "a subclass"), its
    # class stays peft's, and unfuse_lora passes over it without a word.
    torch.manual_seed(0)
    model = randomize_lora(get_peft_model(EmbedNet(), LoraConfig(r=4, lora_alpha=8, target_modules=["embed", "up"])))
    ref = copy.deepcopy(model)
    report, msg = fuse_warning(model)
    assert report.fused == ["base_model.model.up"]
    assert "not a peft lora.Linear" in msg and "Embedding -> base_model.model.embed" in msg
    assert not isinstance(model.base_model.model.embed, lkpeft.FusedLinear)
    ids = torch.randint(0, 16, (3, 5))
    assert rel_err(model(ids), ref(ids)) < TOL and len(spy) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert unfuse_lora(model) == 1


def test_a_lora_variant_runs_peft(spy):
    # aLoRA (a layer.lora_variant) computes its own forward: without alora_offsets, the base
    # layer's output alone. The fused formula would add the adapter everywhere.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="aLoRA is currently only supported")
        model = peft_net(alora_invocation_tokens=[1])
    ref = copy.deepcopy(model)
    report, msg = fuse_warning(model)
    assert int(report) == 0 and "lora_variant): ALoraLinearVariant" in msg
    up, ref_up = model.base_model.model.up, ref.base_model.model.up
    x = torch.randn(4, 24)
    got = up(x)
    assert rel_err(got, ref_up(x)) < TOL and rel_err(got, up.base_layer(x)) < TOL and not spy


def test_lora_modules_peft_did_not_build_run_peft(spy):
    # lora_dropout replaced by another module, lora_B or lora_A given a bias: the fused formula has
    # none of them, so those layers run peft's forward (which calls the modules) with peft's numbers.
    model = peft_net()
    torch.manual_seed(1)
    model.base_model.model.up.lora_dropout["default"] = torch.nn.Tanh()
    for name, lora in (("mid", "lora_B"), ("down", "lora_A")):
        adapter = getattr(getattr(model.base_model.model, name), lora)
        biased = torch.nn.Linear(adapter["default"].in_features, adapter["default"].out_features)
        with torch.no_grad():
            biased.weight.copy_(adapter["default"].weight)
        adapter["default"] = biased
    ref = copy.deepcopy(model)
    report, msg = fuse_warning(model)
    assert report.fused == []
    assert report.fallback == {lkpeft._MODULES: ["base_model.model.up", "base_model.model.mid",
                                                 "base_model.model.down"]}
    x = torch.randn(5, 24)
    assert rel_err(model(x), ref(x)) < TOL and not spy


def test_hooks_on_lora_a_or_lora_b_run_peft(spy):
    """A hook on lora_A or lora_B (offloading, activation statistics, a user's rescale) would be
    skipped by the fused call: those layers run peft's forward, which calls the hooked modules."""
    model = peft_net()
    model.base_model.model.up.lora_A["default"].register_forward_hook(lambda m, a, out: out * 3)
    model.base_model.model.mid.lora_B["default"].register_forward_pre_hook(lambda m, a: (a[0] * -2,))
    ref = copy.deepcopy(model)
    report, msg = fuse_warning(model)
    assert report.fused == ["base_model.model.down"]
    assert report.fallback == {lkpeft._HOOKS: ["base_model.model.up", "base_model.model.mid"]}
    x = torch.randn(5, 24)
    assert rel_err(model(x), ref(x)) < TOL and len(spy) == 1


def test_a_tensor_subclass_base_bias_runs_peft(spy):
    """A base bias that is a tensor subclass (its own ops) beside a plain weight: the kernels
    cannot read it, so that layer runs peft's forward and gives peft's result, not an error."""
    model, ref = peft_net(), peft_net()  # (such a bias does not deepcopy)
    for m in (model, ref):
        down = m.base_model.model.down.base_layer  # (the last layer: its output feeds no other)
        down.bias = torch.nn.Parameter(down.bias.detach().as_subclass(Tagged))
    report, msg = fuse_warning(model)
    assert report.fused == ["base_model.model.up", "base_model.model.mid"]
    assert report.fallback == {lkpeft._WEIGHTS: ["base_model.model.down"]}
    x = torch.randn(5, 24)
    assert rel_err(model(x), ref(x)) < TOL and len(spy) == 2


def test_lora_a_and_b_of_different_dtypes_run_peft(spy):
    # peft raises outside autocast (lora_B's F.linear) and computes inside it: the same here.
    model = peft_net()
    model.base_model.model.up.lora_B["default"].half()
    ref = copy.deepcopy(model)
    report, msg = fuse_warning(model)
    assert report.fused == ["base_model.model.mid", "base_model.model.down"] and "differ in dtype" in msg
    up, ref_up = model.base_model.model.up, ref.base_model.model.up
    x = torch.randn(5, 24)
    with pytest.raises(RuntimeError) as want:
        ref_up(x)
    with pytest.raises(RuntimeError) as got:
        up(x)
    assert str(got.value) == str(want.value)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = up(x), ref_up(x)
    assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want) and not spy


def test_extra_positional_arguments_run_peft(spy):
    # peft passes them on to the base layer, whose error the caller gets (not a fused result).
    model = peft_net()
    ref = copy.deepcopy(model)
    fuse_quietly(model)
    x = torch.randn(5, 24)
    with pytest.raises(TypeError) as want:
        ref.base_model.model.up(x, x)
    with pytest.raises(TypeError) as got:
        model.base_model.model.up(x, x)
    assert str(got.value) == str(want.value) and not spy


def test_unknown_keyword_arguments_run_peft(spy):
    """peft passes keywords it does not know on to the base layer, whose error the caller gets,
    even for a None value (only adapter_names / alora_offsets of None may fuse)."""
    model = peft_net()
    ref = copy.deepcopy(model)
    fuse_quietly(model)
    x = torch.randn(5, 24)
    with pytest.raises(TypeError) as want:
        ref.base_model.model.up(x, scale=None)
    with pytest.raises(TypeError) as got:
        model.base_model.model.up(x, scale=None)
    assert str(got.value) == str(want.value) and not spy
    assert rel_err(model.base_model.model.up(x, adapter_names=None), ref.base_model.model.up(x)) < TOL
    assert len(spy) == 1


def test_the_warning_counts_layers_and_names_classes():
    # One line per reason; the count is of layers, not of reasons.
    model = peft_net(use_dora=True)
    model.base_model.model.mid.__class__ = TaggedLoraLinear
    report, msg = fuse_warning(model)
    assert msg.splitlines() == [
        "lora_kernels.fuse_lora: 3 LoRA layer(s) run peft's own forward, 0 run lora_linear:",
        f"  {lkpeft._DORA} -> base_model.model.up, base_model.model.down",
        f"  {lkpeft._SUBCLASS}: TaggedLoraLinear -> base_model.model.mid"]


# ---------------------------------------------------------------------------------------------
# unfuse, idempotence, deepcopy, torch.compile


def test_unfuse_restores_and_fuse_is_idempotent(spy):
    model = peft_llama()
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 128, (2, 12))
    want = run_llama(ref, ids)[1]

    text = repr(model)
    assert int(fuse_quietly(model)) == N_LLAMA_LORA
    fused_classes = {type(m) for _, m in lora_layers(model)}
    assert int(fuse_quietly(model)) == N_LLAMA_LORA  # second call: nothing wrapped twice
    assert {type(m) for _, m in lora_layers(model)} == fused_classes and len(fused_classes) == 1
    for _, m in lora_layers(model):
        # The fused forward lives on a subclass of peft's class; nothing is put on the instance.
        assert type(m).__bases__ == (PeftLoraLinear,) and isinstance(m, PeftLoraLinear)
        assert "forward" not in vars(m) and m.forward.__func__ is lkpeft.FusedLinear.forward
    assert repr(model) == text  # print(model) does not change
    assert rel_err(run_llama(model, ids)[1], want) < TOL
    assert len(spy) == N_LLAMA_LORA  # one call per layer, not two

    spy.clear()
    assert unfuse_lora(model) == N_LLAMA_LORA
    for _, m in lora_layers(model):
        assert type(m) is PeftLoraLinear and "forward" not in vars(m)
        assert m.forward.__func__ is PeftLoraLinear.forward
    assert rel_err(run_llama(model, ids)[1], want) < TOL and not spy
    assert unfuse_lora(model) == 0

    # And fused again after that, the same way.
    assert int(fuse_quietly(model)) == N_LLAMA_LORA
    assert {type(m) for _, m in lora_layers(model)} == fused_classes
    assert rel_err(run_llama(model, ids)[1], want) < TOL and len(spy) == N_LLAMA_LORA


def test_forward_replaced_on_the_instance(spy):
    # accelerate's hooks replace forward on the instance and call the one they found: a layer
    # hooked before fuse_lora is left alone (patching its class would be bypassed) ...
    hooks = pytest.importorskip("accelerate.hooks")
    model = peft_net()
    ref = copy.deepcopy(model)
    up = model.base_model.model.up
    hooks.add_hook_to_module(up, hooks.ModelHook())
    report, msg = fuse_warning(model)
    assert report.fused == ["base_model.model.mid", "base_model.model.down"]
    assert "already replaced on the instance" in msg and "base_model.model.up" in msg
    assert type(up) is PeftLoraLinear
    x = torch.randn(4, 24)
    assert rel_err(model(x), ref(x)) < TOL and len(spy) == 2

    # ... and one hooked after it keeps running fused inside the hook; unfuse_lora leaves it.
    spy.clear()
    model = peft_net()
    fuse_quietly(model)
    up = model.base_model.model.up
    hooks.add_hook_to_module(up, hooks.ModelHook())
    assert int(fuse_quietly(model)) == 3
    assert rel_err(model(x), ref(x)) < TOL and len(spy) == 3
    with pytest.warns(UserWarning, match="up's forward or class was replaced after fuse_lora"):
        assert unfuse_lora(model) == 2
    assert type(model.base_model.model.mid) is PeftLoraLinear and isinstance(up, lkpeft.FusedLinear)


def test_deepcopy_of_fused_model_is_fused_on_its_own_layers(spy):
    model = peft_net()
    fuse_quietly(model)
    twin = copy.deepcopy(model)
    for (_, a), (_, b) in zip(lora_layers(model), lora_layers(twin)):
        assert type(b) is type(a) and b.forward.__self__ is b and isinstance(b, lkpeft.FusedLinear)
    with torch.no_grad():
        for n, p in twin.named_parameters():
            if "lora_B" in n:
                p.zero_()
    x = torch.randn(3, 24)
    unfuse_lora(model)
    assert rel_err(twin(x), model(x)) > 1e-3  # the twin computes with its own (zeroed) B
    assert len(spy) == 3


def test_pickled_fused_model_loads_fused(spy):
    # torch.save of the whole model (and so pickle, multiprocessing, ...) as for an unfused one.
    model = peft_net()
    ref = copy.deepcopy(model)
    fuse_quietly(model)
    model(torch.randn(5, 24))  # used before saving
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    spy.clear()

    for (_, a), (_, b) in zip(lora_layers(model), lora_layers(loaded)):
        assert b is not a and type(b) is type(a) and isinstance(b, lkpeft.FusedLinear)
    x = torch.randn(5, 24)
    got = loaded(x)
    assert len(spy) == 3  # the loaded model runs lora_linear
    assert rel_err(got, ref(x)) < TOL and rel_err(got, model(x)) < TOL
    assert unfuse_lora(loaded) == 3 and all(type(m) is PeftLoraLinear for _, m in lora_layers(loaded))
    assert rel_err(loaded(x), ref(x)) < TOL


class TaggedLoraLinear(PeftLoraLinear):
    """A subclass of peft's lora.Linear without its own forward (as peft's torchao layer is)."""

    def tag(self):
        return "tagged"


def test_subclass_is_left_to_peft(spy):
    # Its other methods may differ from lora.Linear's (torchao's merge does): fusing would have to
    # change its class to one without them. It keeps peft's forward, and says so.
    model = peft_net()
    mid = model.base_model.model.mid
    mid.__class__ = TaggedLoraLinear
    ref = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="subclass of peft's lora.Linear"):
        report = fuse_lora(model)
    assert int(report) == 2 and type(mid) is TaggedLoraLinear and mid.tag() == "tagged"
    x = torch.randn(4, 24)
    assert rel_err(model(x), ref(x)) < TOL and len(spy) == 2


def test_a_class_made_after_fuse_lora_is_kept(spy):
    # fully_shard (FSDP2) swaps a module's class for a subclass of it: here, of FusedLinear.
    # fuse_lora again keeps that class (the layer stays fused); unfuse_lora leaves it, and says so.
    model = peft_net()
    ref = copy.deepcopy(model)
    fuse_quietly(model)
    up = model.base_model.model.up
    sharded = type("FSDPFusedLinear", (lkpeft.FusedLinear,), {})
    up.__class__ = sharded
    assert int(fuse_quietly(model)) == 3 and type(up) is sharded
    x = torch.randn(4, 24)
    assert rel_err(model(x), ref(x)) < TOL and len(spy) == 3
    with pytest.warns(UserWarning, match="up's forward or class was replaced after fuse_lora"):
        assert unfuse_lora(model) == 2
    assert type(up) is sharded and type(model.base_model.model.mid) is PeftLoraLinear


def test_data_parallel_replica_uses_its_own_weights(spy):
    # nn.DataParallel (HF Trainer wraps in it with several GPUs and no torchrun) runs a replica per
    # device: each must compute with its own copy of the weights, not the original's.
    model = peft_net()
    for m in model.modules():
        if isinstance(m, PeftLoraLinear):
            m.base_layer.weight.requires_grad_(True)  # the base weight gets a gradient too
    ref = copy.deepcopy(model)
    fuse_quietly(model)
    new = {n: p.detach() + 0.1 * torch.randn_like(p) for n, p in model.named_parameters()}
    mine = {n: t.clone().requires_grad_() for n, t in new.items()}
    theirs = {n: t.clone().requires_grad_() for n, t in new.items()}
    replica = replicate_like_data_parallel(model, mine)
    ref_replica = replicate_like_data_parallel(ref, theirs)  # peft's own forward on the same weights
    x = torch.randn(6, 24)
    got, want = replica(x), ref_replica(x)
    assert len(spy) == 3
    assert rel_err(got, want) < TOL
    assert rel_err(got, model(x)) > 1e-3  # the original's weights give something else
    dy = torch.randn_like(got)
    got.backward(dy)
    want.backward(dy)
    for n in new:
        if "lora_" in n or "base_layer.weight" in n:
            assert mine[n].grad is not None and rel_err(mine[n].grad, theirs[n].grad) < TOL, n
    assert all(p.grad is None for p in model.parameters())  # nothing reached the original
    for _, m in lora_layers(replica):
        assert isinstance(m, lkpeft.FusedLinear) and m.forward.__self__ is m


def test_compile_fullgraph(spy):
    model = peft_llama()
    ref = copy.deepcopy(model)
    fuse_quietly(model)
    ops = []

    def backend(gm, example_inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return torch._dynamo.backends.registry.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)  # raises on a graph break
    ids = torch.randint(0, 128, (2, 12))
    loss, logits = run_llama(compiled, ids)
    ref_loss, ref_logits = run_llama(ref, ids)
    assert sum("lora_kernels.lora_linear_fwd" in op for op in ops) == N_LLAMA_LORA
    assert rel_err(logits, ref_logits) < TOL
    loss.backward()
    ref_loss.backward()
    assert_grads_match(model, ref)
    torch._dynamo.reset()


def test_export_records_the_op():
    """torch.export, by default not strict (fake tensors), records each fused layer as the forward
    op, and the program computes peft's forward."""
    model = peft_net().eval()
    ref = copy.deepcopy(model)
    fuse_quietly(model)
    program = torch.export.export(model, (torch.randn(6, 24),))
    calls = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert calls.count(torch.ops.lora_kernels.lora_linear_fwd.default) == 3, calls
    x = torch.randn(6, 24)  # (fresh numbers; the shapes are the traced ones)
    assert rel_err(program.module()(x), ref(x)) < TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_base_fp32_adapters_precision(dtype):
    """peft's default, a 16-bit base with fp32 adapters, without autocast: peft runs the LoRA path
    in fp32, the fused layer in the base's dtype with fp32 accumulation. Output and dX are as far
    from float64 in both; the adapters' gradients carry 16-bit rounding here, fp32's in peft (the
    docs/usage.md's figures: printed with -s)."""
    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(512, 512)).to(dtype),
                           LoraConfig(r=16, lora_alpha=32, target_modules=["0"])).to(DEVICE)
    layer = model.base_model.model[0]
    assert layer.lora_A["default"].weight.dtype == torch.float32  # peft's autocast_adapter_dtype
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.05)
    x, dy = (torch.randn(256, 512).to(DEVICE, dtype) for _ in range(2))

    W, b = layer.base_layer.weight.detach().double(), layer.base_layer.bias.detach().double()
    A, B = (layer.lora_A["default"].weight.detach().double().requires_grad_(),
            layer.lora_B["default"].weight.detach().double().requires_grad_())
    x64 = x.double().requires_grad_()
    y64 = torch.nn.functional.linear(x64, W, b) + layer.scaling["default"] * (x64 @ A.t() @ B.t())
    y64.backward(dy.double())
    want = {"y": y64, "dx": x64.grad, "dA": A.grad, "dB": B.grad}

    def errors():
        xl = x.clone().requires_grad_()
        y = layer(xl)
        y.backward(dy)
        got = {"y": y, "dx": xl.grad, "dA": layer.lora_A["default"].weight.grad,
               "dB": layer.lora_B["default"].weight.grad}
        layer.zero_grad()
        return {k: rel_err(got[k], want[k]) for k in want}

    peft_err = errors()
    fuse_quietly(model)
    fused_err = errors()
    print(f"\n{dtype}: peft {peft_err}\n{dtype}: fused {fused_err}")
    for k in ("y", "dx"):  # the same 16-bit rounding of the output and of dX
        assert fused_err[k] < 1.5 * peft_err[k] + 1e-5, k
    for k in ("dA", "dB"):  # 16-bit rounding of the adapters' products, within the dtype's bound
        assert peft_err[k] < 1e-5 and fused_err[k] < DTYPE_TOL[dtype], k


def test_replace_linear_with_lora_leaves_peft_layers_alone():
    """replace_linear_with_lora given a peft model wraps none of peft's adapter layers, fused or not,
    nor its modules_to_save (their base and adapter Linears wrapped would be adapters on adapters,
    which mark_only_lora_as_trainable then freezes): a warning names them and fuse_lora. The
    model's other Linears get their adapter."""
    model = get_peft_model(llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                               modules_to_save=["lm_head"]))
    for fused in (False, True):
        if fused:
            fuse_lora(model)
        wrapped = copy.deepcopy(model)
        with pytest.warns(UserWarning, match=r"peft's adapter layers .*fuse_lora.*\): "
                                             r"base_model\.model\.model\.layers\.0\.self_attn\.q_proj, "):
            lora_kernels.replace_linear_with_lora(wrapped, rank=2, alpha=1.0)
        tuned = [m for m in wrapped.modules() if isinstance(m, PeftLoraLinear)]
        assert len(tuned) == 4 and all(isinstance(m, lkpeft.FusedLinear) == fused for m in tuned)
        assert not any(isinstance(c, lora_kernels.LinearWithLoRA) for m in tuned for c in m.modules())
        attention = wrapped.base_model.model.model.layers[1].self_attn
        assert isinstance(attention.k_proj, lora_kernels.LinearWithLoRA)
        head = wrapped.base_model.model.lm_head  # (peft's trained copy of it, and the original)
        assert not any(isinstance(m, lora_kernels.LinearWithLoRA) for m in head.modules())


def test_input_dtype_casting_disabled_runs_pefts_forward(spy):
    """peft.helpers.disable_input_dtype_casting hands x to the adapters in its own dtype, which
    peft's forward refuses beside fp32 adapters: a fused layer runs peft's forward there too (its
    error, not a result peft would not give), and fuses again after."""
    from peft.helpers import disable_input_dtype_casting
    net = torch.nn.Sequential(torch.nn.Linear(16, 16)).to(DEVICE, torch.bfloat16)
    model = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))  # (fp32 adapters)
    assert fuse_lora(model).fused == ["base_model.model.0"]
    x = torch.randn(3, 16, device=DEVICE, dtype=torch.bfloat16)
    with disable_input_dtype_casting(model), pytest.raises(RuntimeError, match="dtype"):
        model(x)
    assert spy == []
    model(x)
    assert len(spy) == 1


def test_multihead_attention_is_reported_once():
    """peft's LoRA on nn.MultiheadAttention keeps a LoRA Linear on the base's out_proj, which it
    merges in around each call and never calls: the report names the attention layer alone, not
    that Linear as a second fallback."""
    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x)[0]

    model = get_peft_model(Attention(), LoraConfig(r=2, lora_alpha=4, target_modules=["mha"]))
    with pytest.warns(UserWarning, match="1 LoRA layer"):
        report = fuse_lora(model)
    assert report.fused == [] and list(report.fallback.values()) == [["base_model.model.mha"]]
