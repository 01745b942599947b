from setuptools import find_packages, setup

setup(
    name="lora-kernels",
    version="0.1.0",
    description="A fused LoRA linear layer for PyTorch: Triton kernels forward and backward",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lora_kernels", "lora_kernels.*"]),
    python_requires=">=3.10",  # as torch 2.10
    # torch is not pinned here: a GPU machine keeps the CUDA torch it has. Triton ships inside
    # CUDA torch wheels on Linux; the CPU wheel does not carry it, so name it for Linux. The
    # minimums are the oldest versions the suite has passed with (torch 2.10 with Triton 3.6, the
    # Triton its wheels carry; Triton 3.5 lacks APIs the launcher uses, with torch 2.8 and Triton
    # 3.4 the kernels failed, and Triton 3.1 lacks their TMA API).
    install_requires=["torch>=2.10", "numpy", "triton>=3.6; sys_platform == 'linux'"],
    extras_require={
        "test": ["pytest>=7", "safetensors", "peft", "transformers"],
        "bench": ["matplotlib", "tqdm", "pytest-benchmark", "peft", "transformers"],
        "peft": ["peft", "transformers", "safetensors"],
    },
)
