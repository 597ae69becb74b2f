"""The feature database: one record per (dictionary, latent) with its statistics, contexts, DLA and explanation
(``feature_records`` describes a record), the token windows the contexts point into, and each dictionary's
analysis metadata. SQLite, a file in the run folder, by default; MongoDB (pymongo) when params give a
``mongo_uri``, with the same records, as OpenMOSS Language-Model-SAEs keeps its analyses. Writes are upserts
keyed by (dictionary, latent), so re-running an analysis updates records and never duplicates them; an
analysis leaves an explanation in place, and an explanation leaves the analysis.

A dictionary is keyed by its weights (``dictionary_fingerprint``), not its path: a copied or renamed dictionary
reads its own analysis, two runs with alike paths never share records, and a dictionary retrained into the same
folder is a new key, whose first analysis deletes the old one's records (explanations and scores included).
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch

from dictlearn.errors import UserError
from dictlearn.files import read_torch
from dictlearn.formats.run_folder import AE_FILE
from dictlearn.params import AnalysisParams

# Fields an analysis writes, and those `analyze.py explain` writes; the nested ones are JSON text in SQLite.
ANALYSIS_FIELDS = (
    "fired_tokens",
    "frequency",
    "max_activation",
    "mean_activation",
    "histogram",
    "top_contexts",
    "levels",
    "quiet_windows",
    "top_tokens",
    "dla",
)
EXPLANATION_FIELDS = ("explanation", "explained_by", "detection_accuracy", "detection_contexts")
JSON_FIELDS = frozenset({"histogram", "top_contexts", "levels", "quiet_windows", "top_tokens", "dla"})

SCHEMA = """
CREATE TABLE IF NOT EXISTS analyses (
    dictionary TEXT PRIMARY KEY,
    meta TEXT NOT NULL                -- JSON: model, hook, num_latents, k, tokens_scanned, context_size, levels
);
CREATE TABLE IF NOT EXISTS windows (
    dictionary TEXT NOT NULL,
    window INTEGER NOT NULL,          -- the window's index in the analysis pass
    tokens TEXT NOT NULL,             -- JSON list of its token strings
    PRIMARY KEY (dictionary, window)
);
CREATE TABLE IF NOT EXISTS latents (
    dictionary TEXT NOT NULL,
    latent INTEGER NOT NULL,
    fired_tokens INTEGER NOT NULL,
    frequency REAL NOT NULL,          -- fraction of the scanned tokens it fires on
    max_activation REAL NOT NULL,
    mean_activation REAL NOT NULL,    -- over the tokens it fires on
    histogram TEXT NOT NULL,          -- JSON {"bin_width", "counts"}
    top_contexts TEXT NOT NULL,       -- JSON list of {"window", "activation", "max_position", "acts"}
    levels TEXT NOT NULL,             -- JSON list of {"low", "high", "contexts"}, fractions of the max
    quiet_windows TEXT NOT NULL,      -- JSON list of windows where it never fired
    top_tokens TEXT NOT NULL,         -- JSON list of the tokens at its top contexts' maxima
    dla TEXT NOT NULL,                -- JSON {"promoted": [{"token", "logit"}, ...], "suppressed": [...]}
    explanation TEXT,
    explained_by TEXT,                -- the model that wrote the explanation
    detection_accuracy REAL,
    detection_contexts INTEGER,       -- contexts the accuracy was measured on
    PRIMARY KEY (dictionary, latent)
);
"""


def dictionary_name(folder: str | Path) -> str:
    """A dictionary's name for people: ``<model>/<hook>/<run>``, the last three parts of its folder."""
    return "/".join(Path(folder).resolve().parts[-3:])


def dictionary_fingerprint(source: str | Path | Mapping[str, torch.Tensor]) -> str:
    """A dictionary's key in the database: ``sha256:<hex>`` over its state dict (each entry's name, dtype, shape
    and bytes, in sorted name order). ``source`` is the state dict, the weights file, or the dictionary folder.

    Hashing tensors rather than the file's bytes keeps the key when the same weights are saved again."""
    if not isinstance(source, Mapping):
        path = Path(source)
        source = read_torch(path / AE_FILE if path.is_dir() else path, "dictionary weights")
    digest = hashlib.sha256()
    for name in sorted(source):
        value = source[name]
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous().reshape(-1)  # view() needs a dimension
            digest.update(f"{name}\0{tensor.dtype}\0{tuple(value.shape)}\0".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes())  # bytes: bfloat16 has no numpy type
        else:
            digest.update(f"{name}\0{value!r}\0".encode())
    return "sha256:" + digest.hexdigest()


class FeatureStore(Protocol):
    location: str

    def write_analysis(self, dictionary: str, meta: dict, records: list[dict], windows: dict[int, list[str]]) -> None:
        """Upsert the analysis fields of ``records`` and replace the dictionary's metadata and windows; delete
        the analyses of other dictionaries whose ``meta["folder"]`` is this one's (a retrain into the folder)."""

    def set_explanation(self, dictionary: str, latent: int, fields: dict) -> None:
        """Write ``EXPLANATION_FIELDS`` of one latent."""

    def meta(self, dictionary: str) -> dict | None: ...

    def latents(self, dictionary: str, ids: list[int] | None = None) -> list[dict]:
        """Records of ``ids`` (all when None), in latent order."""

    def windows(self, dictionary: str, ids: set[int] | None = None) -> dict[int, list[str]]:
        """Token strings of the windows ``ids`` (all when None)."""

    def search(self, dictionary: str, text: str, limit: int) -> list[dict]:
        """Records whose explanation, top tokens or promoted tokens contain ``text`` (any case)."""

    def close(self) -> None: ...


class SQLiteStore:
    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.location = str(path)
        try:
            self.connection = sqlite3.connect(path)
            self.connection.executescript(SCHEMA)
        except sqlite3.DatabaseError as err:
            raise UserError(f"analysis.database: {path} is not a feature database ({err})") from None

    def write_analysis(self, dictionary: str, meta: dict, records: list[dict], windows: dict[int, list[str]]) -> None:
        columns = ", ".join(ANALYSIS_FIELDS)
        marks = ", ".join("?" for _ in ANALYSIS_FIELDS)
        updates = ", ".join(f"{field} = excluded.{field}" for field in ANALYSIS_FIELDS)
        rows = [
            (dictionary, r["latent"], *(json.dumps(r[f]) if f in JSON_FIELDS else r[f] for f in ANALYSIS_FIELDS))
            for r in records
        ]
        with self.connection:
            replaced = self.connection.execute(
                "SELECT dictionary FROM analyses WHERE json_extract(meta, '$.folder') = ? AND dictionary != ?",
                (meta.get("folder"), dictionary),
            ).fetchall()
            for table in ("analyses", "windows", "latents"):
                self.connection.executemany(f"DELETE FROM {table} WHERE dictionary = ?", replaced)
            self.connection.execute(
                "INSERT INTO analyses (dictionary, meta) VALUES (?, ?) "
                "ON CONFLICT (dictionary) DO UPDATE SET meta = excluded.meta",
                (dictionary, json.dumps(meta)),
            )
            self.connection.execute("DELETE FROM windows WHERE dictionary = ?", (dictionary,))
            self.connection.executemany(
                "INSERT INTO windows (dictionary, window, tokens) VALUES (?, ?, ?)",
                [(dictionary, w, json.dumps(tokens)) for w, tokens in windows.items()],
            )
            self.connection.executemany(
                f"INSERT INTO latents (dictionary, latent, {columns}) VALUES (?, ?, {marks}) "
                f"ON CONFLICT (dictionary, latent) DO UPDATE SET {updates}",
                rows,
            )

    def set_explanation(self, dictionary: str, latent: int, fields: dict) -> None:
        updates = ", ".join(f"{field} = ?" for field in EXPLANATION_FIELDS)
        with self.connection:
            self.connection.execute(
                f"UPDATE latents SET {updates} WHERE dictionary = ? AND latent = ?",
                (*(fields[f] for f in EXPLANATION_FIELDS), dictionary, latent),
            )

    def meta(self, dictionary: str) -> dict | None:
        row = self.connection.execute("SELECT meta FROM analyses WHERE dictionary = ?", (dictionary,)).fetchone()
        return json.loads(row[0]) if row else None

    def _records(self, where: str, arguments: tuple | dict) -> list[dict]:
        fields = ("dictionary", "latent", *ANALYSIS_FIELDS, *EXPLANATION_FIELDS)
        cursor = self.connection.execute(f"SELECT {', '.join(fields)} FROM latents WHERE {where}", arguments)
        return [
            {f: json.loads(value) if f in JSON_FIELDS else value for f, value in zip(fields, row)} for row in cursor
        ]

    def latents(self, dictionary: str, ids: list[int] | None = None) -> list[dict]:
        if ids is None:
            return self._records("dictionary = ? ORDER BY latent", (dictionary,))
        marks = ", ".join("?" for _ in ids)
        return self._records(f"dictionary = ? AND latent IN ({marks}) ORDER BY latent", (dictionary, *ids))

    def windows(self, dictionary: str, ids: set[int] | None = None) -> dict[int, list[str]]:
        query, arguments = "SELECT window, tokens FROM windows WHERE dictionary = ?", (dictionary,)
        if ids is not None:
            query += f" AND window IN ({', '.join('?' for _ in ids)})"
            arguments += tuple(ids)
        cursor = self.connection.execute(query, arguments)
        return {window: json.loads(tokens) for window, tokens in cursor}

    def search(self, dictionary: str, text: str, limit: int) -> list[dict]:
        # LIKE is case-insensitive for ASCII; '\' escapes the pattern's own wildcards.
        where = (
            "dictionary = :dictionary AND (explanation LIKE :pattern ESCAPE '\\' "
            "OR EXISTS (SELECT 1 FROM json_each(top_tokens) WHERE value LIKE :pattern ESCAPE '\\') "
            "OR EXISTS (SELECT 1 FROM json_each(dla, '$.promoted') "
            "WHERE json_extract(value, '$.token') LIKE :pattern ESCAPE '\\')) ORDER BY latent LIMIT :limit"
        )
        pattern = "%" + re.sub(r"([%_\\])", r"\\\1", text) + "%"
        return self._records(where, {"dictionary": dictionary, "pattern": pattern, "limit": limit})

    def close(self) -> None:
        self.connection.close()


class MongoStore:
    """Collections ``analyses``, ``windows`` and ``latents``, with unique indexes on their keys."""

    def __init__(self, uri: str, database: str, timeout_s: float = 5.0) -> None:
        import pymongo
        from pymongo.errors import PyMongoError

        self.location = f"{uri} (database {database})"
        client = None
        try:
            client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=int(timeout_s * 1000))
            client.admin.command("ping")
        except PyMongoError as err:
            if client is not None:
                client.close()
            reason = re.split(r" \(configured timeouts|, Timeout: ", str(err))[0][:160]
            raise UserError(f"analysis.mongo_uri: cannot reach MongoDB at {uri} ({reason})") from None
        self.client = client
        self.db = client[database]
        self.db.analyses.create_index("dictionary", unique=True)
        self.db.windows.create_index([("dictionary", 1), ("window", 1)], unique=True)
        self.db.latents.create_index([("dictionary", 1), ("latent", 1)], unique=True)

    def write_analysis(self, dictionary: str, meta: dict, records: list[dict], windows: dict[int, list[str]]) -> None:
        from pymongo import UpdateOne

        if meta.get("folder") is not None:
            same_folder = {"meta.folder": meta["folder"], "dictionary": {"$ne": dictionary}}
            replaced = [document["dictionary"] for document in self.db.analyses.find(same_folder)]
            for collection in (self.db.analyses, self.db.windows, self.db.latents):
                collection.delete_many({"dictionary": {"$in": replaced}})
        self.db.analyses.replace_one({"dictionary": dictionary}, {"dictionary": dictionary, "meta": meta}, upsert=True)
        self.db.windows.delete_many({"dictionary": dictionary})
        if windows:
            self.db.windows.insert_many(
                [{"dictionary": dictionary, "window": w, "tokens": tokens} for w, tokens in windows.items()]
            )
        self.db.latents.bulk_write(
            [
                UpdateOne(
                    {"dictionary": dictionary, "latent": r["latent"]},
                    {
                        "$set": {f: r[f] for f in ANALYSIS_FIELDS},
                        "$setOnInsert": dict.fromkeys(EXPLANATION_FIELDS),
                    },
                    upsert=True,
                )
                for r in records
            ]
        )

    def set_explanation(self, dictionary: str, latent: int, fields: dict) -> None:
        self.db.latents.update_one(
            {"dictionary": dictionary, "latent": latent}, {"$set": {f: fields[f] for f in EXPLANATION_FIELDS}}
        )

    def meta(self, dictionary: str) -> dict | None:
        document = self.db.analyses.find_one({"dictionary": dictionary})
        return document["meta"] if document else None

    def _records(self, query: dict, limit: int = 0) -> list[dict]:
        return list(self.db.latents.find(query, {"_id": False}).sort("latent", 1).limit(limit))

    def latents(self, dictionary: str, ids: list[int] | None = None) -> list[dict]:
        query = {"dictionary": dictionary} if ids is None else {"dictionary": dictionary, "latent": {"$in": ids}}
        return self._records(query)

    def windows(self, dictionary: str, ids: set[int] | None = None) -> dict[int, list[str]]:
        query = (
            {"dictionary": dictionary} if ids is None else {"dictionary": dictionary, "window": {"$in": sorted(ids)}}
        )
        cursor = self.db.windows.find(query)
        return {document["window"]: document["tokens"] for document in cursor}

    def search(self, dictionary: str, text: str, limit: int) -> list[dict]:
        pattern = {"$regex": re.escape(text), "$options": "i"}
        fields = ("explanation", "top_tokens", "dla.promoted.token")
        return self._records({"dictionary": dictionary, "$or": [{f: pattern} for f in fields]}, limit)

    def close(self) -> None:
        self.client.close()


def database_path(settings: AnalysisParams) -> Path:
    return Path(settings.database or Path(settings.dictionary) / "analysis" / "features.sqlite")


def open_feature_store(settings: AnalysisParams, create: bool) -> FeatureStore:
    """MongoDB when ``mongo_uri`` is set, else the SQLite file (made when ``create``; else it must exist)."""
    if settings.mongo_uri:
        return MongoStore(settings.mongo_uri, settings.mongo_database)
    path = database_path(settings)
    if not create and not path.is_file():
        raise UserError(f"no feature database at {path}; run `analyze.py run` first")
    return SQLiteStore(path)


def stored_analysis(store: FeatureStore, dictionary: str, folder: str | Path) -> dict:
    """The metadata of the analysis of ``dictionary`` (the fingerprint of the weights in ``folder``); a store
    without one is refused, as after a retrain into the folder."""
    meta = store.meta(dictionary)
    if meta is None:
        raise UserError(
            f"{store.location} holds no analysis of the dictionary now in {folder} (weights {dictionary[:19]}); "
            "run `analyze.py run` first"
        )
    return meta
