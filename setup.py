"""fr_distill: distributed knowledge distillation for deep face recognition."""
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildPyWithConfigs(build_py):
    """Copy ``configs/`` into the built package (``fr_distill/configs``): the commands of an
    installed package find the demo and study specs there (``fr_distill.resources``). An
    editable install reads the checkout's ``configs/`` directly."""

    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):
            shutil.copytree("configs", Path(self.build_lib) / "fr_distill" / "configs",
                            dirs_exist_ok=True)


EXTRAS = {
    "dali": ["nvidia-dali-cuda130"],
    "onnx": ["onnx", "onnxruntime", "onnx2torch", "onnxscript"],
    "timm": ["timm"],
    "eval": ["scikit-learn", "matplotlib"],
    "wandb": ["wandb>=0.19.10"],  # reinit="finish_previous"
    "dev": ["pytest", "pytest-timeout"],
}
EXTRAS["all"] = sorted({dep for deps in EXTRAS.values() for dep in deps})

setup(
    name="fr_distill",
    version="0.1.0",
    description="Distributed multi-GPU knowledge distillation for deep face recognition "
                "(SphereFace2 + ILED + RPSD)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fr_distill", "fr_distill.*"]),
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "numpy>=2.0",  # numpy.trapezoid
        "pyyaml",
        "pillow",
        "simplejpeg",
        "scikit-learn",
        "matplotlib",
        "tensorboard",
        "tqdm",
    ],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["fr-distill=fr_distill.cli:main"]},
    cmdclass={"build_py": BuildPyWithConfigs},
)
