"""The worked example, end to end in --quick mode: LoRA fine-tuning learns, the adapter is small,
and an adapter reloaded into a fresh model reproduces the fine-tuned model exactly; and the
README's "Use" block as printed."""

import importlib.util
import re
from pathlib import Path

import pytest
import torch

import lora_kernels
from conftest import LAUNCHES, TOL, rel_err

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune_tiny_gpt.py"


@pytest.fixture(scope="module")
def example():
    # examples/ is not a package: load the script as a module and call its main() in-process.
    spec = importlib.util.spec_from_file_location("finetune_tiny_gpt", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# (cuda: the README's "on a GPU it runs through the fused kernels with no change", in the GPU run's shards)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_quick_run(example, tmp_path, capsys, device):
    plot = tmp_path / "loss.png"
    launched = LAUNCHES[0]
    out = example.main(["--quick", "--device", device, "--plot", str(plot)])
    if device == "cuda":
        assert LAUNCHES[0] > launched  # through the kernels
    printed = capsys.readouterr().out

    ft = out["finetune_losses"]
    assert len(ft) == 40 and len(out["pretrain_losses"]) == 60
    # Fine-tuning learns the new task: the training loss and the held-out loss both fall a lot.
    first, last = sum(ft[:3]) / 3, sum(ft[-3:]) / 3
    assert last < 0.6 * first, (first, last)
    assert out["eval_after"] < 0.6 * out["eval_before"], (out["eval_before"], out["eval_after"])

    # Only the adapters trained, and the adapter file is a small fraction of the model's.
    assert 0 < out["trainable"] < 0.1 * out["total"]
    assert out["adapter_bytes"] * 10 < out["base_bytes"], (out["adapter_bytes"], out["base_bytes"])

    # Base weights from before fine-tuning + the adapter file give exactly the fine-tuned loss.
    assert out["eval_reloaded"] == out["eval_after"]
    assert "equal" in printed and "DIFFERENT" not in printed

    if importlib.util.find_spec("matplotlib"):
        assert plot.stat().st_size > 1000
    else:  # the example still runs without matplotlib, and says so
        assert "matplotlib is not installed" in printed


def test_plot_only_where_asked_and_counts_checked(example, tmp_path):
    """No plot unless --plot names one (a run must not rewrite the README's committed picture), and
    an explicit 0 is refused by name, not replaced by the default."""
    assert example.parse_args([]).plot == ""
    for flag in ("--rank", "--steps"):
        with pytest.raises(SystemExit):
            example.parse_args(["--quick", flag, "0"])
    assert example.parse_args(["--quick", "--rank", "3"]).rank == 3


def test_readme_use_block_runs_as_written():
    """The README's first code block ("Use") runs as printed, and computes what it says it does."""
    readme = (EXAMPLE.parents[1] / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    (use,) = [b for b in blocks if "import torch, lora_kernels" in b]
    scope = {}
    exec(compile(use, "README.md (Use)", "exec"), scope)

    model, layer, x, A, B, y = (scope[k] for k in ("model", "layer", "x", "A", "B", "y"))
    # Every nn.Linear of the model was wrapped, with the adapters in fp32 beside the bf16 base.
    wrapped = [m for m in model if isinstance(m, lora_kernels.LinearWithLoRA)]
    assert len(wrapped) == 2 and not any(type(m) is torch.nn.Linear for m in model)
    assert all(m.lora.A.dtype == torch.float32 and m.linear.weight.dtype == torch.bfloat16 for m in wrapped)
    # The function call's y against float64.
    f64 = [t.detach().double() for t in (x, layer.linear.weight, layer.linear.bias, A, B)]
    expected = f64[0] @ f64[1].T + f64[2] + 2.0 * (f64[0] @ f64[3] @ f64[4])
    assert y.shape == (4, 512)
    assert rel_err(y, expected) < TOL[torch.float32]
