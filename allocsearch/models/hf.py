"""Read and write Hugging Face model directories (config.json + safetensors) without torch.

``load_model(path)`` returns a :class:`HFModel`: the family adapter, the parameter dict
(jax arrays in the chosen dtype, or with ``lazy=True`` a :class:`LazyParams` of host
arrays memory-mapped from the safetensors files), the tensors the forward does not use but
a saved copy must keep, and a fingerprint that identifies the weights (used by supernet
stores and recipes to refuse mixing models).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from allocsearch.models.base import ModelAdapter
from allocsearch.models.bert import BertAdapter
from allocsearch.models.gpt2 import GPT2Adapter
from allocsearch.models.llama import LlamaAdapter
from allocsearch.models.moe import MoEAdapter
from allocsearch.models.phi3 import Phi3Adapter
from allocsearch.models.safetensors_io import read_header, read_safetensors, write_safetensors

FAMILIES: dict[str, type[ModelAdapter]] = {
    "llama": LlamaAdapter,
    "mistral": LlamaAdapter,
    "qwen2": LlamaAdapter,
    "qwen3": LlamaAdapter,
    "olmo2": LlamaAdapter,
    "granite": LlamaAdapter,
    "gemma": LlamaAdapter,
    "gemma2": LlamaAdapter,
    "gemma3_text": LlamaAdapter,
    "phi3": Phi3Adapter,
    "mixtral": MoEAdapter,
    "qwen2_moe": MoEAdapter,
    "qwen3_moe": MoEAdapter,
    "olmoe": MoEAdapter,
    "gpt2": GPT2Adapter,
    "bert": BertAdapter,
}
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "granite": "GraniteForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "bert": "BertModel",
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SAFETENSORS_DTYPE_NAMES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


class ModelLoadError(ValueError):
    """A model directory cannot be read: missing files, unknown type, bad tensors."""


@dataclass
class HFModel:
    """A loaded model.

    Attributes:
      adapter: the family adapter (forward, layers, block structure).
      params: parameter name -> jax array, canonical (out, in) layout; or, loaded with
        ``lazy=True``, a :class:`LazyParams` mapping to host numpy arrays read on access.
      extras: checkpoint tensors the forward does not use (e.g. BERT pooler), kept so a
        saved copy loses nothing.
      fingerprint: short hex digest of the config and weights.
      path: where it was loaded from, if anywhere.
    """

    adapter: ModelAdapter
    params: dict[str, jax.Array] | LazyParams
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    fingerprint: str = ""
    path: str | None = None


def adapter_for_config(hf_config: Mapping[str, Any]) -> ModelAdapter:
    """The family adapter for a config.json dict; unknown types are an error."""
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise ModelLoadError(f"unknown model_type {model_type!r}; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type](hf_config)


def _tensor_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{index}: not a safetensors index ({e})") from None
        files = sorted({path / f for f in weight_map.values()})
        for f in files:
            if not f.exists():
                raise ModelLoadError(f"{index} names shard {f.name}, which is missing")
        return files
    if single.exists():
        return [single]
    raise ModelLoadError(
        f"{path}: no model.safetensors or model.safetensors.index.json "
        f"(found: {sorted(p.name for p in path.iterdir())[:10]})"
    )


# Elements per slice of the lazy finite check (bounds its float32 temporary to 64 MiB).
_FINITE_CHUNK = 1 << 24


def _check_finite(name: str, arr: np.ndarray, where: str) -> None:
    """Raise ModelLoadError naming ``name`` when ``arr`` holds NaN or Inf; reads it in
    slices so a memory-mapped tensor is never copied whole."""
    flat = arr.ravel(order="K")  # a view for C- and Fortran-ordered (transposed) tensors
    for i in range(0, flat.size, _FINITE_CHUNK):
        if not np.isfinite(flat[i : i + _FINITE_CHUNK].astype(np.float32)).all():
            raise ModelLoadError(f"{where}: tensor {name!r} contains NaN or Inf values")


class LazyParams(Mapping):
    """Parameter name -> host numpy array, read from memory-mapped safetensors on access.

    What :func:`load_model` returns with ``lazy=True``: nothing is read at load time
    beyond headers and the fingerprint's sample. ``params[name]`` is the tensor in the
    requested dtype and canonical layout: a read-only view of the mapped file when the
    file's dtype is the requested one (GPT-2's transposed Conv1D weights are transposed
    views), else a fresh converted copy made on every access and not kept, so the
    process holds at most the tensors its caller keeps. ``jnp.asarray(params[name])``
    moves one tensor to the device; ``dict(params)`` reads them all.

    With ``check_finite`` each tensor is checked for NaN and Inf the first time it is
    accessed (a whole-model check at load would read every byte of a 70B model); a bad
    tensor raises :class:`ModelLoadError` naming it before its values are returned.

    Pickling reopens the files (e.g. on a Ray worker) instead of copying the weights.
    """

    def __init__(
        self,
        views: Mapping[str, np.ndarray],
        dtype: np.dtype,
        *,
        check_finite: bool,
        source: tuple[str, str, bool] | None = None,
    ):
        # Plain ndarray views (not np.memmap instances, whose astype copies would pass
        # for mapped arrays); their base is still the mapping.
        self._views = {name: np.asarray(v) for name, v in views.items()}
        self._dtype = np.dtype(dtype)
        self._check = bool(check_finite)
        self._checked: set[str] = set()
        self._source = source  # (model directory, dtype name, check_finite) for pickling

    def __getitem__(self, name: str) -> np.ndarray:
        view = self._views[name]
        if self._check and name not in self._checked:
            _check_finite(name, view, self._source[0] if self._source else "model")
            self._checked.add(name)
        return view if view.dtype == self._dtype else view.astype(self._dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._views)

    def __len__(self) -> int:
        return len(self._views)

    @property
    def dtype(self) -> np.dtype:
        """The dtype every value is returned in."""
        return self._dtype

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of one parameter, without reading it."""
        return tuple(self._views[name].shape)

    def stored_nbytes(self, name: str) -> int:
        """Bytes of one parameter as stored in its file (what reading it costs)."""
        return int(self._views[name].nbytes)

    @property
    def nbytes(self) -> int:
        """Bytes of every parameter in the requested dtype (nothing is read)."""
        return int(sum(v.size for v in self._views.values())) * self._dtype.itemsize

    def __reduce__(self):
        if self._source is None:
            raise TypeError("LazyParams built without a source directory cannot be pickled")
        return (_reopen_lazy_params, self._source)

    def __repr__(self) -> str:
        where = self._source[0] if self._source else "memory"
        return f"LazyParams({len(self)} tensors, dtype={self._dtype}, from {where!r})"


def _reopen_lazy_params(path: str, dtype: str, check_finite: bool) -> LazyParams:
    params = load_model(path, dtype=dtype, check_finite=check_finite, lazy=True).params
    assert isinstance(params, LazyParams)
    return params


def fingerprint_tensors(config: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> str:
    """Digest of the config and of every tensor's name, shape, dtype and a strided sample of
    its bytes (every 64th KiB, so a 7B model fingerprints in seconds). Lower precision
    copies of one model have different fingerprints."""
    h = hashlib.blake2b(digest_size=12)
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "n_embd", "n_layer")
    h.update(json.dumps({k: config.get(k) for k in keys}, sort_keys=True).encode())
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        h.update(f"{name}:{arr.shape}:{arr.dtype}".encode())
        raw = arr.reshape(-1).view(np.uint8)
        if raw.size <= 1 << 20:
            h.update(raw.tobytes())
        else:
            chunk = 4096
            starts = np.arange(0, raw.size - chunk, 1 << 16)
            h.update(np.concatenate([raw[s : s + chunk] for s in starts]).tobytes())
    return h.hexdigest()


def directory_fingerprint(path: str | os.PathLike, hf_config: Mapping[str, Any]) -> str | None:
    """``HFModel.fingerprint`` of the model directory ``path`` (whose config.json is
    ``hf_config``) from its safetensors files, memory-mapped and sampled as
    :func:`fingerprint_tensors` does (no model is built); None when it holds no weights (a
    config.json alone)."""
    path = Path(path)
    if (
        not (path / "model.safetensors").exists()
        and not (path / "model.safetensors.index.json").exists()
    ):
        return None
    raw: dict[str, np.ndarray] = {}
    for f in _tensor_files(path):
        raw.update(read_safetensors(f))
    return fingerprint_tensors(hf_config, raw)


def load_model(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    check_finite: bool = True,
    lazy: bool = False,
) -> HFModel:
    """Load a Hugging Face model directory.

    Args:
      path: directory with config.json and model.safetensors (or a sharded index).
      dtype: ``"float32"`` or ``"bfloat16"``: the dtype of the returned parameters.
      check_finite: refuse weights containing NaN or Inf (names the tensor).
      lazy: return the parameters as a :class:`LazyParams` of host arrays memory-mapped
        from the files (read and converted per tensor on access, NaN/Inf checked at first
        access) instead of device arrays; the process then holds no copy of the model.
        Fingerprint, shape checks and the extras are the same either way.
    Raises:
      ModelLoadError: missing files, unknown model_type, missing or unexpected tensors,
        shape mismatches (naming the tensor and the expected shape), non-finite weights.
    """
    path = Path(path)
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} not supported; valid: {list(DTYPES)}")
    if not path.exists():
        raise ModelLoadError(f"model directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise ModelLoadError(
            f"model path {str(path)!r} is a file, expected a directory (config.json and "
            f"*.safetensors)"
        )
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise ModelLoadError(f"{path}: config.json is missing")
    try:
        hf_config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_path}: invalid JSON ({e})") from None
    adapter = adapter_for_config(hf_config)
    raw: dict[str, np.ndarray] = {}
    for f in _tensor_files(path):
        raw.update(read_safetensors(f))
    fingerprint = fingerprint_tensors(hf_config, raw)
    tensors = adapter.from_hf_tensors(raw)
    expected = adapter.param_shapes
    passthrough = getattr(adapter, "passthrough_prefixes", ())
    extras = {k: np.asarray(v) for k, v in tensors.items() if k.startswith(passthrough)}
    unexpected = sorted(k for k in tensors if k not in expected and k not in extras)
    if unexpected:
        raise ModelLoadError(
            f"{path}: tensors not part of a {adapter.model_type} model with this config: "
            f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    for name, shape in expected.items():
        if name not in tensors:
            raise ModelLoadError(f"{path}: tensor {name!r} is missing (expected shape {shape})")
        if tuple(tensors[name].shape) != shape:
            raise ModelLoadError(
                f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape}"
            )
    if lazy:
        views = {name: tensors[name] for name in expected}
        lazy_params = LazyParams(
            views,
            np.dtype(DTYPES[dtype]),
            check_finite=check_finite,
            source=(str(path), dtype, check_finite),
        )
        return HFModel(adapter, lazy_params, extras, fingerprint, str(path))
    params: dict[str, jax.Array] = {}
    for name in expected:
        arr = tensors[name]
        if check_finite:
            _check_finite(name, arr, str(path))
        params[name] = jnp.asarray(arr, dtype=DTYPES[dtype])
    return HFModel(adapter, params, extras, fingerprint, str(path))


def save_model(
    model: HFModel,
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    config_updates: Mapping[str, Any] | None = None,
    copy_files: Sequence[str | os.PathLike] = (),
) -> Path:
    """Write ``model`` as a Hugging Face directory (config.json + safetensors, sharded with
    an index above ``max_shard_bytes``), plus a copy of each of ``copy_files`` (e.g. the
    source directory's tokenizer files) under its own name. The directory is assembled
    under a temporary name and renamed into place, so an interrupted save never leaves a
    complete-looking model. An existing ``path`` is refused unless ``overwrite``."""
    path = Path(path)
    if dtype not in SAFETENSORS_DTYPE_NAMES:
        raise ValueError(f"dtype {dtype!r} not supported; valid: {list(SAFETENSORS_DTYPE_NAMES)}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    np_dtype = SAFETENSORS_DTYPE_NAMES[dtype]
    host = {k: np.asarray(v, dtype=np.float32).astype(np_dtype) for k, v in model.params.items()}
    tensors = model.adapter.to_hf_tensors(host)
    tensors.update(model.extras)
    config = dict(model.adapter.hf_config)
    config.setdefault("architectures", [ARCHITECTURES[model.adapter.model_type]])
    config["torch_dtype"] = dtype  # transformers 4 reads this key
    config["dtype"] = dtype  # and transformers 5 this one
    config.update(config_updates or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o755)  # mkdtemp creates 0700
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        shards: list[dict[str, np.ndarray]] = [{}]
        size = 0
        for name in sorted(tensors):
            nbytes = tensors[name].nbytes
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = tensors[name]
            size += nbytes
        for extra in copy_files:
            shutil.copyfile(extra, tmp / Path(extra).name)
        meta = {"format": "pt"}
        if len(shards) == 1:
            write_safetensors(tmp / "model.safetensors", shards[0], meta)
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(tmp / fname, shard, meta)
                weight_map.update(dict.fromkeys(shard, fname))
            total = sum(t.nbytes for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        if path.exists():
            backup = path.with_name(f".{path.name}.old")
            os.replace(path, backup)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(backup, path)  # a failed save leaves the old model in place
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def model_num_bytes(model: HFModel) -> int:
    """Bytes of the parameters in their dtype (for lazy parameters, without reading them)."""
    if isinstance(model.params, LazyParams):
        return model.params.nbytes
    return int(sum(math.prod(v.shape) * v.dtype.itemsize for v in model.params.values()))


__all__ = [
    "FAMILIES",
    "HFModel",
    "LazyParams",
    "ModelLoadError",
    "adapter_for_config",
    "directory_fingerprint",
    "fingerprint_tensors",
    "load_model",
    "read_header",
    "save_model",
]
