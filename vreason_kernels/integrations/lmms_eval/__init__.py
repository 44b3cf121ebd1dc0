"""lmms-eval model ``vreason``: V-Reason decoding of a Hugging Face Qwen2.5-VL checkpoint.

Registered through the ``lmms_eval.models`` entry point (see ``pyproject.toml``), so after
``pip install 'vreason-kernels[eval]'``::

    lmms-eval --model vreason --model_args pretrained=Qwen/Qwen2.5-VL-7B-Instruct,lr=0.05 --tasks videomme
    lmms-eval --model vreason --model_args pretrained=...,enabled=False ...   # the base model

Data-parallel runs go through lmms-eval's own ``accelerate launch``. Importing this package
does not import lmms-eval; :mod:`.model` does.
"""

MODEL_ID = "vreason"
MODEL_CLASS_PATH = "vreason_kernels.integrations.lmms_eval.model.VReasonLMM"


def manifest():
    """The entry point's payload: lmms-eval's ``ModelManifest`` for ``--model vreason``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS_PATH)
