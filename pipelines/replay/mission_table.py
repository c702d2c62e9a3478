"""``MissionTable``: the Ray actor that turns mission texts into the replay's int32 ``mission_id`` and back.

The replay stores one int32 per transition, not the text. Ids are handed out in order of first sight
(0, 1, 2, ...) by this one named actor, so every EnvRunner (restarted ones too) and every Learner agree.
Callers cache what they have been told: a run with one prompt asks once per process. The table is saved
as JSON next to each replay checkpoint and loaded back on resume, so old rows keep their meaning.
"""

from __future__ import annotations

import json
from pathlib import Path

import ray

from genie_world.atomic_files import write_file_atomic

from .config import NAMESPACE

TABLE_FILE = "missions.json"


class MissionTableImpl:
    def __init__(self, path: str | None = None):
        self.path = None if path is None else Path(path)
        self.texts: list[str] = []
        self.ids: dict[str, int] = {}
        if self.path is not None and self.path.is_file():  # a restarted actor: the same ids as before
            self.load(load_mission_table(self.path.parent, self.path.name))

    def load(self, texts: list[str]) -> int:
        """Replace the table (a resumed run's saved one); returns its size."""
        if len(set(texts)) != len(texts):
            raise ValueError("mission table: the saved table repeats a mission text")
        self.texts = [str(t) for t in texts]
        self.ids = {t: i for i, t in enumerate(self.texts)}
        self._persist()
        return len(self.texts)

    def ids_of(self, texts: list[str]) -> list[int]:
        """The id of each text, new texts getting the next free ids."""
        out, grew = [], False
        for t in texts:
            t = str(t)
            if t not in self.ids:
                self.ids[t] = len(self.texts)
                self.texts.append(t)
                grew = True
            out.append(self.ids[t])
        if grew:
            self._persist()
        return out

    def _persist(self) -> None:
        if self.path is not None:
            write_table(self.path, self.texts)

    def texts_of(self, ids: list[int]) -> list[str]:
        bad = [i for i in ids if not 0 <= int(i) < len(self.texts)]
        if bad:
            raise ValueError(f"mission table: unknown mission ids {bad[:5]} (table has {len(self.texts)})")
        return [self.texts[int(i)] for i in ids]

    def table(self) -> list[str]:
        return list(self.texts)


MissionTable = ray.remote(num_cpus=0, max_restarts=-1)(MissionTableImpl)


def start_mission_table(name: str, texts: list[str] | None = None, path: str | None = None):
    """Create (or get) the run's table actor (live file ``path``); ``texts`` replaces its contents."""
    handle = MissionTable.options(name=name, namespace=NAMESPACE, get_if_exists=True).remote(path)
    if texts is not None:
        ray.get(handle.load.remote(list(texts)))
    return handle


def get_mission_table(name: str):
    return ray.get_actor(name, namespace=NAMESPACE)


def write_table(path: Path, texts: list[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps({"missions": list(texts)}, indent=0)
    write_file_atomic(path, lambda tmp: Path(tmp).write_text(data))
    return path


def save_mission_table(handle, directory) -> Path:
    return write_table(Path(directory) / TABLE_FILE, ray.get(handle.table.remote()))


def load_mission_table(directory, name: str = TABLE_FILE) -> list[str]:
    path = Path(directory) / name
    if not path.is_file():
        raise FileNotFoundError(f"mission table {path}: no such file (a replay checkpoint without its missions)")
    try:
        texts = json.loads(path.read_text())["missions"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"mission table {path}: unreadable ({e})") from None
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"mission table {path}: 'missions' must be a list of strings")
    return texts
