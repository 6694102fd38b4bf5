"""Do a checkpoint's stored weights fit a model? Names and shapes compared, read from the safetensors
header only, so that a mismatch (an experiment.json from another run, say) is reported in one line that
says what to do, as fast for a large model as for a small one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from tformer.config import ModelConfig
from tformer.input_paths import readable_name
from tformer.model import Transformer
from tformer.training.checkpoint import EXPERIMENT_FILE, WEIGHTS_FILE, CheckpointError


def check_weights(checkpoint_dir: Path, model_config: ModelConfig | None = None) -> None:
    """Refuse a model.safetensors that load_weights would refuse as missing, corrupt or cut short, or (given
    the model's config) as holding tensors of other names or shapes, reading only its header (which must
    describe the whole file): as fast for a large model as for a small one."""
    path = Path(checkpoint_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file: {path}")
    try:
        with readable_name(path) as name, safe_open(name, "pt"):
            pass
    except SafetensorError as error:
        raise CheckpointError(f"{path}: corrupt or truncated weights ({error})") from None
    if model_config is not None:
        with torch.device("meta"):  # shapes only: no memory, however large the model
            model = Transformer(model_config)
        disagreement = weights_disagreement(model, path)
        if disagreement is not None:
            raise CheckpointError(f"{path}: weights do not match the model in {EXPERIMENT_FILE}: {disagreement}")


def weights_disagreement(model: torch.nn.Module, path: Path) -> str | None:
    """How the tensors named in a safetensors header differ from `model`'s, in one line that ends with what
    to do; None where names and shapes all agree. A tensor the model shares under several names (tied
    embeddings) is stored under one of them."""
    with readable_name(path) as openable, safe_open(openable, "pt") as weights:
        stored = {name: list(weights.get_slice(name).get_shape()) for name in weights.keys()}  # noqa: SIM118 (not iterable)
    expected = model.state_dict(keep_vars=True)
    aliases: dict[int, list[str]] = {}
    for name, tensor in expected.items():
        aliases.setdefault(id(tensor), []).append(name)
    missing = [names[0] for names in aliases.values() if not any(name in stored for name in names)]
    unexpected = [name for name in stored if name not in expected]  # in the header's (sorted) order
    reshaped = [name for name in expected if name in stored and stored[name] != list(expected[name].shape)]
    if not (missing or unexpected or reshaped):
        return None
    parts = []
    if reshaped:
        first = reshaped[0]
        parts.append(
            f"{len(reshaped)} of {len(stored)} tensors differ in shape (first {first}: {stored[first]} in the "
            f"weights, {list(expected[first].shape)} in the model)"
        )
    if missing:
        parts.append(f"{len(missing)} tensors the model needs are missing (first {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} stored tensors are not in the model (first {unexpected[0]})")
    return (
        f"{'; '.join(parts)}; the run's files disagree: put back the {EXPERIMENT_FILE} saved with these weights "
        f"(or the weights saved with it)"
    )


def not_floating_point(path: Path) -> str | None:
    """The first tensor of a safetensors file that holds no floating-point numbers, with its dtype, read from
    the header; None where all do, as in every model's weights (integers or booleans were copied into the
    model's float tensors and translated with)."""
    with readable_name(path) as openable, safe_open(openable, "pt") as weights:
        for name in weights.keys():  # noqa: SIM118 (not iterable)
            dtype = weights.get_slice(name).get_dtype()
            if not dtype.startswith(("F", "BF")):  # F16, BF16, F32, F64, F8_E4M3, ...
                return f"{name} ({dtype})"
    return None
