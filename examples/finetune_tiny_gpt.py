"""Pre-train a tiny GPT, then fine-tune it to a new task with LoRA adapters only.

The whole story of LoRA in one script, on data it generates itself (no downloads):

1. Pre-train a small character-level GPT (token + position embeddings, 2 transformer blocks, LM
   head) on lines of the alphabet *forwards* with a random start: "pqrstuvw\\n", "xyzabcde\\n", ...
2. Fine-tune it on the alphabet *backwards* ("wvutsrqp\\n"): the same characters and format, a
   different rule. Every nn.Linear in the blocks becomes a ``LinearWithLoRA`` and only the LoRA
   ``A`` and ``B`` train; the base weights stay frozen.
3. Save the adapter alone and compare its size with the base model's state dict, then rebuild a
   fresh model from the saved base weights, load the adapter and check its loss is the same.

Runs on the CPU (PyTorch path) or, with ``--device cuda``, through the fused Triton kernels; the
code is the same because ``LinearWithLoRA`` dispatches on the tensors' device.

    python examples/finetune_tiny_gpt.py             # 20 s to 2 min on 2 CPU cores (idle to busy)
    python examples/finetune_tiny_gpt.py --quick     # seconds, tiny sizes (used by the tests)
"""

import argparse
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:
    import lora_kernels  # noqa: F401  (only checks the package is importable)
except ImportError:  # run from a checkout without installing: use the package next to examples/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import lora_kernels

from lora_kernels import replace_linear_with_lora
from lora_kernels.adapters import (count_parameters, format_parameter_count, load_adapter,
                                   mark_only_lora_as_trainable, peft_alpha, save_adapter)
from lora_kernels.functional import select_backend

# ---------------------------------------------------------------------------------------------
# Data: lines of the alphabet, stepping +1 (pre-training) or -1 (fine-tuning) modulo 26.

ALPHABET = "abcdefghijklmnopqrstuvwxyz"
NEWLINE = len(ALPHABET)  # token id of "\n"; the vocabulary is the 26 letters and the newline
VOCAB = NEWLINE + 1


LINE_LEN = 8


def best_loss(line_len=LINE_LEN):
    """Only a line's first letter is unpredictable: ln(26) nats once per line of line_len + 1 tokens."""
    return math.log(len(ALPHABET)) / (line_len + 1)


def make_stream(step, n_lines, line_len, generator):
    """One long token stream of ``n_lines`` lines: a random first letter, then ``step`` per letter."""
    starts = torch.randint(len(ALPHABET), (n_lines, 1), generator=generator)
    letters = (starts + step * torch.arange(line_len)) % len(ALPHABET)
    lines = torch.cat([letters, torch.full((n_lines, 1), NEWLINE)], dim=1)
    return lines.flatten()


def decode(tokens):
    return "".join("\n" if t == NEWLINE else ALPHABET[t] for t in tokens.tolist())


def get_batch(stream, batch_size, block_size, generator, device):
    """Random windows of the stream: inputs and the same windows shifted by one as targets."""
    starts = torch.randint(len(stream) - block_size - 1, (batch_size,), generator=generator)
    idx = starts[:, None] + torch.arange(block_size + 1)
    chunk = stream[idx].to(device)
    return chunk[:, :-1], chunk[:, 1:]


# ---------------------------------------------------------------------------------------------
# Model: a minimal GPT. Every projection is an nn.Linear, so replace_linear_with_lora finds it.

@dataclass
class Config:
    d_model: int = 128
    n_head: int = 4
    n_layer: int = 2
    block_size: int = 64


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(VOCAB, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, VOCAB)

    def forward(self, idx, targets=None):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


# ---------------------------------------------------------------------------------------------
# Training helpers.

def train(model, stream, steps, lr, args, generator, label, weight_decay=0.0):
    """AdamW on the parameters that require grad; returns the loss of every step."""
    params = [p for p in model.parameters() if p.requires_grad]  # frozen ones get no optimizer state
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    # Cosine decay: a high rate early for speed, a low one late so the last losses are steady.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    losses = []
    for step in range(1, steps + 1):
        x, y = get_batch(stream, args.batch_size, args.cfg.block_size, generator, args.device)
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step == 1 or step == steps or step % args.log_every == 0:
            print(f"  {label} step {step:4d}/{steps}  loss {losses[-1]:.4f}")
    return losses


@torch.no_grad()
def evaluate(model, batches):
    model.eval()
    return sum(model(x, y).item() for x, y in batches) / len(batches)


def safetensors_available():
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return False
    return True


def save_tensors(tensors, path):
    """A plain state dict, in the same format as the adapter so the sizes compare fairly."""
    if str(path).endswith(".safetensors"):
        import safetensors.torch
        safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    else:
        torch.save(tensors, path)


def load_tensors(path):
    if str(path).endswith(".safetensors"):
        import safetensors.torch
        return safetensors.torch.load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def plot_losses(pretrain, finetune, path):
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path}")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(range(1, len(pretrain) + 1), pretrain, color="tab:blue")
    ax1.set_title("pre-training: alphabet forwards (all weights)")
    ax2.plot(range(1, len(finetune) + 1), finetune, color="tab:orange")
    ax2.set_title("LoRA fine-tuning: alphabet backwards (A, B only)")
    for ax in (ax1, ax2):
        ax.axhline(best_loss(), color="gray", linestyle="--", linewidth=1, label="best possible")
        ax.legend(loc="upper right")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy loss")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"loss plot written to {path}")


# ---------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="LoRA fine-tuning steps (default 150, --quick 40)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="pre-training steps (default 200, --quick 60)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny model and few steps: a smoke test in seconds")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default 8, --quick 2)")
    p.add_argument("--lora-alpha", type=float, default=None,
                   help="peft-style lora_alpha; the layer's scale is lora_alpha / rank (default 2 * rank)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--log-every", type=int, default=None, help="print the loss every N steps (1: every step)")
    p.add_argument("--plot", default="", metavar="PNG",
                   help="write the loss plot here (default: none; the README's is examples/loss.png, a full run's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    quick = args.quick
    args.cfg = Config(d_model=64, n_head=4, block_size=32) if quick else Config()
    defaults = {"steps": (40, 150), "pretrain_steps": (60, 200), "rank": (2, 8), "batch_size": (16, 32),
                "log_every": (10, 25)}
    for name, (small, full) in defaults.items():  # (an explicit 0 is kept, and refused below)
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    for name in ("steps", "pretrain_steps", "rank", "batch_size", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    args.lora_alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.rank
    return args


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)  # data sampling, separate from init for repeatability
    forwards = make_stream(+1, 4000, LINE_LEN, g)
    backwards = make_stream(-1, 4000, LINE_LEN, g)
    eval_g = torch.Generator().manual_seed(args.seed + 1)
    eval_fwd = [get_batch(forwards, 64, args.cfg.block_size, eval_g, args.device) for _ in range(4)]
    eval_bwd = [get_batch(backwards, 64, args.cfg.block_size, eval_g, args.device) for _ in range(4)]
    print(f"tasks: pre-train on {decode(forwards[:18])!r}..., fine-tune on {decode(backwards[:18])!r}...")

    # 1. Pre-train the whole model on the forward alphabet.
    model = TinyGPT(args.cfg).to(args.device)
    print(f"\npre-training TinyGPT on {args.device}: "
          f"{format_parameter_count(*count_parameters(model))}")
    pretrain_losses = train(model, forwards, args.pretrain_steps, 3e-3, args, g, "pre-train", weight_decay=0.01)
    before = evaluate(model, eval_bwd)
    print(f"pre-trained: loss {evaluate(model, eval_fwd):.4f} on forwards, {before:.4f} on backwards "
          f"(best possible {best_loss():.4f})")

    with tempfile.TemporaryDirectory() as tmp:
        ext = ".safetensors" if safetensors_available() else ".pt"
        base_path = Path(tmp, "base_model" + ext)
        adapter_path = Path(tmp, "adapter" + ext)
        save_tensors(model.state_dict(), base_path)

        # 2. LoRA on the blocks' projections only. The LM head is left as it is: the vocabulary and
        # what each output row means are the same for both tasks, so what changes is the mapping
        # inside the blocks (peft's usual targets are these attention and MLP projections too).
        alpha = peft_alpha(args.lora_alpha, args.rank)
        replace_linear_with_lora(model.blocks, args.rank, alpha)
        model.to(args.device)  # the new A and B are created on the CPU
        mark_only_lora_as_trainable(model)
        trainable, total = count_parameters(model)
        # (the path a block's output projection takes: d_model features in and out, a batch's tokens)
        probe = torch.empty(*eval_bwd[0][0].shape, args.cfg.d_model, device=args.device)
        backend = select_backend(probe, torch.float32, args.cfg.d_model)
        print(f"\nLoRA fine-tuning (rank {args.rank}, lora_alpha {args.lora_alpha:g} -> alpha {alpha:g}, "
              f"LoRA layers run on the {'fused Triton kernels' if backend == 'triton' else 'PyTorch path'}): "
              f"{format_parameter_count(trainable, total)}")
        finetune_losses = train(model, backwards, args.steps, 1e-2, args, g, "LoRA")
        after = evaluate(model, eval_bwd)
        print(f"fine-tuned: loss {after:.4f} on backwards (was {before:.4f}); "
              f"{evaluate(model, eval_fwd):.4f} on forwards with the adapter on")

        # 3. Store the adapter alone; a task costs this file instead of another copy of the model.
        save_adapter(model, adapter_path)
        adapter_bytes, base_bytes = adapter_path.stat().st_size, base_path.stat().st_size
        print(f"\nadapter file {adapter_bytes:,} bytes vs full model state dict {base_bytes:,} bytes "
              f"({base_bytes / adapter_bytes:.1f}x smaller)")

        # A fresh model: base weights from the file saved *before* fine-tuning, then the adapter.
        # Matching losses show the adapter holds everything fine-tuning changed (the base stayed frozen).
        fresh = TinyGPT(args.cfg)
        fresh.load_state_dict(load_tensors(base_path))
        replace_linear_with_lora(fresh.blocks, args.rank, alpha)
        fresh.to(args.device)
        load_adapter(fresh, adapter_path)
        reloaded = evaluate(fresh, eval_bwd)
        print(f"reloaded adapter into a fresh model: loss {reloaded:.6f} vs fine-tuned {after:.6f} "
              f"({'equal' if reloaded == after else f'DIFFERENT by {abs(reloaded - after):.2e}'})")

    if args.plot:
        plot_losses(pretrain_losses, finetune_losses, args.plot)
    seconds = time.perf_counter() - t0
    print(f"\nsummary: {format_parameter_count(trainable, total)}; adapter {adapter_bytes:,} B vs model "
          f"{base_bytes:,} B; LoRA loss {finetune_losses[0]:.4f} -> {finetune_losses[-1]:.4f}; "
          f"wall time {seconds:.1f} s")
    return {
        "pretrain_losses": pretrain_losses, "finetune_losses": finetune_losses,
        "trainable": trainable, "total": total, "adapter_bytes": adapter_bytes, "base_bytes": base_bytes,
        "eval_before": before, "eval_after": after, "eval_reloaded": reloaded, "seconds": seconds,
    }


if __name__ == "__main__":
    main()
