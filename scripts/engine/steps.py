"""A step of the main job: one ``python -m monai.bundle run`` of the bundle's configs, its command line and its
fingerprint (config files, overrides less file locations, input files), run in-process unless its output is current.
"""

from __future__ import annotations

import json
import logging
import shlex
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from monai.bundle import ConfigParser, ConfigWorkflow

from scripts.engine import fingerprint

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
logger = logging.getLogger("main_job")


class _SkipLoggingFileNotice(logging.Filter):
    """Drop MONAI's warning that ``logging_file=False`` skips its logging config: the main job sets up logging itself,
    so the warning would be one of our own making on every step."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Logging file is set to False")


logging.getLogger("monai.bundle.workflows").addFilter(_SkipLoggingFileNotice())
# an overlay such as paper_resnext.json extends the saliency settings ("+saliency"); the configs of a step that has none
# get an unused copy, which MONAI warns about on every such step
warnings.filterwarnings("ignore", message=r"Can't merge entry \['\+saliency'\]", category=UserWarning)

# overrides that only say where files are: their contents enter the fingerprint as input files, so a moved
# bundle or dataset folder does not make finished steps stale
LOCATION_KEYS = (
    "bundle_root",
    "dataset_dir",
    "datalist",
    "init_weights",
    "intermediate_datalist",
    "output_dir",
)


@dataclass
class Step:
    """One ``python -m monai.bundle run <run_id> --config_file <configs> --<key> <value> ...``."""

    name: str
    configs: tuple[str, ...]  # file names under configs/, later ones override earlier ones
    overrides: dict
    output: Path  # the file whose presence (and fingerprint) says the step is done
    inputs: dict = field(default_factory=dict)  # role -> file whose contents the output depends on
    run_id: str = "run"
    always: bool = False  # steps with their own up-to-date check (the synthetic generator) run every time

    def __post_init__(self) -> None:  # as a config declares them: lists and path strings
        self.configs = tuple(self.configs)
        self.output = Path(self.output)
        self.inputs = {role: None if f is None else Path(f) for role, f in self.inputs.items()}

    def with_settings(self, settings: Mapping[str, Any], overlays: Sequence[str] = ()) -> "Step":
        """This step with the ``overlays`` (config file names) merged after its configs and, under its own
        overrides, those of ``settings`` (config ids -> values) that its configs declare (:func:`declares`)."""
        configs = self.configs + tuple(overlays)
        ids = config_ids(configs)
        given = {k: v for k, v in settings.items() if declares(ids, k)}
        return replace(self, configs=configs, overrides={**given, **self.overrides})

    def fingerprint(self) -> fingerprint.Fingerprint:
        settings = {k: v for k, v in self.overrides.items() if k not in LOCATION_KEYS}
        return fingerprint.compute(
            [CONFIGS / c for c in self.configs], {"run_id": self.run_id, **settings}, self.inputs
        )

    def command(self, root: Path | None = None, compact: bool = False) -> str:
        """The step as a shell command run from the bundle folder.

        Args:
            root: paths under it are written relative to it (``.``); ``None``: paths as they are.
            compact: leave out the overrides that equal the configs' own values (evaluated with ``bundle_root``
                ``.``), as in the documented sequence.
        """
        files = "[" + ",".join(f"'configs/{c}'" for c in self.configs) + "]"
        words = ["python", "-m", "monai.bundle", "run"] + ([self.run_id] if self.run_id != "run" else [])
        words += ["--config_file", files]
        overrides = {k: _relative(v, root) for k, v in self.overrides.items()}
        defaults = _config_values(self.configs, overrides) if compact else {}
        for k, v in overrides.items():  # values as Python literals (the command line's parser reads those)
            if k in defaults and defaults[k] == v:
                continue
            words += [f"--{k}", v if isinstance(v, str) else repr(v)]
        return " ".join(_quote(w) for w in words)


def step_configs() -> list[str]:
    """The configs a main-job step runs, by file name: ``configs/*.json`` but the main job's plan and its overlays,
    the ablation's arms, the metadata and the multi-GPU overlay (for ``torchrun`` runs by hand)."""
    plans = ("main_job", "ablation", "metadata", "multi_gpu")
    return [p.name for p in sorted(CONFIGS.glob("*.json")) if not p.stem.startswith(plans)]


def config_ids(configs: Sequence[str] | None = None) -> set[str]:
    """Every id the ``configs`` (file names under ``configs/``; ``None``: :func:`step_configs`) declare, nested ones as
    ``a#b``; a ``+key`` merge in an overlay names the key it extends, and an overlay's ``a#b`` key its id."""
    ids: set[str] = set()

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                key = prefix + key.lstrip("+")
                ids.update("#".join(key.split("#")[: n + 1]) for n in range(key.count("#") + 1))
                walk(item, key + "#")

    for name in step_configs() if configs is None else configs:
        walk(json.loads((CONFIGS / name).read_text()), "")
    return ids


def config_defaults(configs: Sequence[str] | None = None) -> dict[str, list[tuple[str, Any]]]:
    """The literal settings of the ``configs`` (``None``: :func:`step_configs`): id -> the
    ``(file, value)`` pairs that set it, for a command's help. Expressions, references, lists and objects
    (``_target_``) are left out."""
    out: dict[str, list[tuple[str, Any]]] = {}

    def walk(value: Any, prefix: str, file: str) -> None:
        for key, item in value.items():
            if isinstance(item, dict) and "_target_" not in item:
                walk(item, prefix + key + "#", file)
            elif (
                item is None
                or isinstance(item, (bool, int, float))
                or (isinstance(item, str) and item[:1] not in ("$", "@", "%"))
            ):
                out.setdefault(prefix + key.lstrip("+"), []).append((file, item))

    for name in configs or step_configs():
        walk(json.loads((CONFIGS / name).read_text()), "", name)
    return out


def declares(ids: set[str], key: str) -> bool:
    """Whether ``key`` (``a#b#0#c``) names one of ``ids`` or something inside an item of a list among them (past the
    longest declared id, a list index)."""
    parts = key.split("#")
    n = next((n for n in range(len(parts), 0, -1) if "#".join(parts[:n]) in ids), 0)
    return n > 0 and (n == len(parts) or parts[n].isdigit())


def config_value(configs: Sequence[str], key: str, overrides: Mapping[str, Any] | None = None) -> Any:
    """What ``key`` resolves to in the ``configs`` (merged in order) with ``overrides``: a default read from the
    configs rather than repeated.

    Args:
        configs: file names under ``configs/``, later ones overriding earlier ones.
        key: the config id (``a#b`` for nested).
        overrides: config ids and values set before resolving (only those the configs declare).
    """
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / c) for c in configs])
    ids = config_ids(configs)
    parser.update({k: v for k, v in (overrides or {}).items() if declares(ids, k)})
    return parser.get_parsed_content(key)


def _relative(value: Any, root: Path | None) -> Any:
    if isinstance(value, str) and root is not None and (value == str(root) or value.startswith(str(root) + "/")):
        return "." + value[len(str(root)) :]
    return value


def _config_values(configs: Sequence[str], keys: Sequence[str]) -> dict:
    """What the ``configs`` (merged in order, ``bundle_root`` ``.``) resolve ``keys`` to; keys that cannot be
    evaluated without data are left out."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / c) for c in configs])
    parser["bundle_root"] = "."
    out = {}
    for k in keys:
        try:
            out[k] = parser.get_parsed_content(k)
        except Exception:  # noqa: BLE001 - e.g. a value that reads a datalist: keep the override
            continue
    return out


def _quote(word: str) -> str:
    """Shell quoting that keeps a config list readable: ``"['configs/a.json','configs/b.json']"``."""
    if "'" in word and not any(c in word for c in '"$`\\!'):
        return f'"{word}"'
    return shlex.quote(word)


def run_config(configs: Sequence[str], overrides: dict, run_id: str = "run") -> None:
    """Run one bundle workflow in this process (``initialize`` -> ``run_id`` -> ``finalize``).

    Args:
        configs: config file names under ``configs/``, later ones overriding earlier ones.
        overrides: config ids and the values that replace the configs' own.
        run_id: the config id of the workflow to run.
    """
    wf = ConfigWorkflow(
        config_file=[str(CONFIGS / c) for c in configs],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False,
        workflow_type="train" if "train.json" in configs and run_id == "run" else None,
        run_id=run_id,
        **overrides,
    )
    wf.initialize()
    wf.run()
    wf.finalize()


def _stamp(path: Path) -> tuple[int, int] | None:
    """``(mtime in ns, size)`` of ``path``, ``None`` when absent: whether a step rewrote its output."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


def run_step(step: Step) -> dict:
    """Run ``step`` unless its output is current.

    Returns:
        What happened, for ``main_job.json``: ``step``, ``ran``, ``command`` and, when it ran, ``why`` and
        ``seconds``.

    Raises:
        RuntimeError: the step finished without writing its output.
    """
    if step.always:
        logger.info("[%s] (the generator reuses its files when they are current)", step.name)
        before = _stamp(step.output)
        t0 = time.time()
        run_config(step.configs, step.overrides, step.run_id)
        if before is not None and _stamp(step.output) == before:  # the generator found its output current
            return {"step": step.name, "ran": False, "command": step.command()}
        seconds = round(time.time() - t0, 1)
        return {"step": step.name, "ran": True, "why": "generated", "seconds": seconds, "command": step.command()}
    fp = step.fingerprint()
    reason = fingerprint.why_stale(step.output, fp)
    if reason is None:
        logger.info("[%s] up to date, skipped (%s)", step.name, step.output)
        return {"step": step.name, "ran": False, "command": step.command()}
    fingerprint.forget(step.output)
    logger.info("[%s] running (%s) ...", step.name, reason)
    t0 = time.time()
    run_config(step.configs, step.overrides, step.run_id)
    if not step.output.is_file():
        raise RuntimeError(f"[{step.name}] finished without writing {step.output}")
    fingerprint.record(step.output, fp)
    seconds = round(time.time() - t0, 1)
    logger.info("[%s] done in %.0f s -> %s", step.name, seconds, step.output)
    return {"step": step.name, "ran": True, "why": reason, "seconds": seconds, "command": step.command()}
