"""The one way to open a model folder (train's output, or a version pulled from the store).

evaluate, promote and classify all read a model folder; doing it in one place means the
same checks everywhere: model.keras present and non-empty, labels.json a list of class
names, every file the card.json lists matching its recorded sha256 (a tampered or
half-copied model is refused before Keras parses it), the model loaded with
safe_mode=True (no arbitrary code from a lambda layer), its output width equal to the
class count, and its input size read from the model itself.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from hemaflow.errors import StageInputError, require_dir, require_file

MODEL_FILE = "model.keras"
LABELS_FILE = "labels.json"
CARD_FILE = "card.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_classes(labels_path: Path) -> tuple[str, ...]:
    """labels.json written by train: a JSON list of at least two class names, in output order."""
    require_file(labels_path, "class labels file")
    try:
        classes = json.loads(labels_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StageInputError(labels_path, f"not valid JSON: {exc}") from exc
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) for c in classes)):
        raise StageInputError(labels_path, "expected a JSON list of at least two class names")
    return tuple(classes)


@dataclass
class ModelFolder:
    path: Path
    classes: tuple[str, ...]
    sha256: str                          # of model.keras
    card: dict | None = None             # card.json of a promoted version, if present
    _model: object | None = field(default=None, repr=False)

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def labels_path(self) -> Path:
        return self.path / LABELS_FILE

    def load(self):
        """The Keras model (compile=False, safe_mode=True), checked against the class list.

        A model trained in mixed precision runs in float32 on a host that would not pick that
        policy itself (e.g. a bf16 model on a CPU without bf16 instructions, where it is emulated)."""
        if self._model is None:
            import keras

            from hemaflow.devices import resolve_precision
            from hemaflow.models import float32_copy, mixed_policy

            try:
                model = keras.models.load_model(self.model_path, compile=False, safe_mode=True)
            except Exception as exc:  # a truncated or foreign file fails in many ways
                raise StageInputError(self.model_path, f"cannot be loaded as a Keras model: {exc}") from exc
            n_out = model.output_shape[-1]
            if n_out != len(self.classes):
                raise StageInputError(self.labels_path, f"lists {len(self.classes)} classes but the model "
                                                        f"outputs {n_out}")
            trained_in = mixed_policy(model)
            if trained_in is not None and trained_in != resolve_precision("auto"):
                model = float32_copy(model)
            self._model = model
        return self._model

    @property
    def precision(self) -> str:
        """The dtype policy the loaded model computes in (after load's float32 fallback)."""
        from hemaflow.models import mixed_policy

        return mixed_policy(self.load()) or "float32"

    @property
    def image_size(self) -> int:
        return int(self.load().input_shape[1])


def verify_card_files(model_dir: Path, card: dict) -> None:
    """Every file the card lists exists in model_dir with the recorded sha256; names stay inside."""
    root = model_dir.resolve()
    for name, meta in (card.get("files") or {}).items():
        target = (model_dir / name).resolve()
        if not target.is_relative_to(root) or "/" in name or "\\" in name:
            raise StageInputError(model_dir / CARD_FILE, f"lists a file name '{name}' outside the model folder")
        if not target.is_file():
            raise StageInputError(target, f"listed in {CARD_FILE} but missing")
        actual = sha256_file(target)
        if actual != meta.get("sha256"):
            raise StageInputError(target, f"sha256 mismatch: {CARD_FILE} records {meta.get('sha256')}, the file has "
                                          f"{actual} (tampered or damaged); refusing to load it")


def open_model_folder(model_dir: Path) -> ModelFolder:
    """Check a model folder and return its facts; the Keras model loads on first use (.load())."""
    model_dir = require_dir(Path(model_dir), "model folder")
    model_path = require_file(model_dir / MODEL_FILE, "trained model")
    if model_path.stat().st_size == 0:
        raise StageInputError(model_path, "model file is empty")
    classes = read_classes(model_dir / LABELS_FILE)
    card = None
    card_path = model_dir / CARD_FILE
    if card_path.is_file():
        try:
            card = json.loads(card_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StageInputError(card_path, f"not valid JSON: {exc}") from exc
        verify_card_files(model_dir, card)
    return ModelFolder(path=model_dir, classes=classes, sha256=sha256_file(model_path), card=card)
