"""``xclip view``: a run in the browser. A small HTTP server on 127.0.0.1 (the standard library's) answers
JSON questions about one run directory, and the page in ``xclip/show/static/`` draws the answers.

Every request opens the run file anew through :class:`xclip.store.reader.RunReader` and reads only what it needs (a
page of the pair table, one pair's map), so a 100,000-pair run opens as fast as a 10-pair one, and a run that
is still being written shows what is finished at each reload. ``export_site`` writes the same page with the
data of chosen pairs into a folder that opens from the file system, for sharing.

The run file holds zeros, not NaN, in the numbers of pairs that are not done (the fill value is recorded but
never written, see :func:`xclip.store.layout.fixed_dataset`): the viewer reads them as missing, so that unfinished pairs neither sort
among nor pass filters as finished ones, and show no value.

The server answers only requests for its own origin (one ``Host``, the one a browser sends for ``127.0.0.1:PORT``
or ``localhost:PORT``, and the same authority in an absolute-form request line), so a site whose name is rebound
to 127.0.0.1 cannot read the run. Its answers hold no absolute path of the machine (the run folder by its name,
the data root cut from failure reasons), it serves images only from inside the data root, it answers an index
that is none of the run's with 404, and it drops clients that stall or leave without a traceback.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import shutil
import sys
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import numpy as np
from PIL import Image

from xclip.models.base import read_image
from xclip.disk.archives import ArchiveMembers, MemberBytes
from xclip.show.colours import COLORMAP, CONTOUR, colour_table, outline_mask
from xclip.errors import ConfigError, XclipError
from xclip.disk.files import write_atomically, write_text_atomically
from xclip.core.geometry import Preprocessing
from xclip.attribution.inputs_read import input_notes
from xclip.store.describe import inputs_read_of_pair
from xclip.models.loading import looks_like_path
from xclip.show.links import DISPLAY_SIDE, caption_chips, view_link  # noqa: F401  (view_link: re-exported)
from xclip.attribution.result import inexact_pair_note, is_inexact_pair
from xclip.store.schema import (
    CAPTION_INDEX,
    GROUPS,
    IMAGE_INDEX,
    IMAGES,
    MAP_ERROR_BOUND,
    PAIR_NUMBERS,
    PAIR_TABLE_NUMBERS,
    PAIRS,
    RELATIVE_COMPLETENESS_ERROR,
    SCORE,
    SHA256,
    STATUS,
    TERMS,
    Status,
)
from xclip.store.reader import MissingImage, RunReader, needs_contributions_message
from xclip.attribution.summary import PairSummary

STATIC = Path(__file__).resolve().parent / "static"
ASSETS = {"index.html": "text/html", "viewer.js": "text/javascript", "viewer.css": "text/css"}
SORT_KEYS = ("index", *PAIR_TABLE_NUMBERS, "status", "caption", "image")  # every number column sorts
THUMBNAIL_SIDE = 80  # the table shows thumbnails at 40 px: twice that stays sharp on high-density screens
# a thumbnail's address names its image's content (``?v=``), so the browser may keep it for good
THUMBNAIL_CACHE = "private, max-age=31536000, immutable"
RUN_SCALE_SAMPLE = 256
SOCKET_TIMEOUT_S = 10.0  # a client silent this long, mid-request or mid-answer, is disconnected
# the most digits an index in an address may have: no run holds 10**18 items, and every shorter decimal fits int64
MAX_INDEX_DIGITS = 18
# an absolute-form request target (RFC 9112 3.2.2): scheme, authority, then the path and query
ABSOLUTE_FORM = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?]*)(.*)", re.DOTALL)


class NotFound(ConfigError):
    """A pair or image that is not a finished one of the run, an index that is not one, or a thumbnail address
    that names another picture: the server answers 404 (an image file that is not there raises
    :class:`xclip.store.reader.MissingImage`, also answered 404)."""


class Misdirected(ConfigError):
    """A request for another origin: its ``Host``, or the authority of its absolute-form target, is not this
    server's own address (as a page of a site whose name was rebound to 127.0.0.1 sends it). Answered 421."""


class OutsideDataRoot(ConfigError):
    """An image whose stored path leads out of the data root (``..``, an absolute path, a link): the server
    answers 403 rather than read a file the run file points at."""


@dataclass(frozen=True)
class PairQuery:
    """A page of the pair table: sorted by one column, filtered by status, caption text, score and error."""

    sort: str = "index"
    descending: bool = False
    status: str = "all"  # all, done, failed, pending
    text: str = ""  # caption contains (case-insensitive)
    min_score: float = -math.inf
    max_score: float = math.inf
    max_error: float = math.inf  # relative completeness error
    offset: int = 0
    limit: int = 100

    @classmethod
    def from_params(cls, params: dict[str, list[str]]) -> PairQuery:
        def one(name: str, default: str) -> str:
            return params.get(name, [default])[0]

        try:
            query = cls(
                sort=one("sort", "index"), descending=one("order", "asc") == "desc", status=one("status", "all"),
                text=one("text", ""), min_score=float(one("min_score", "-inf") or "-inf"),
                max_score=float(one("max_score", "inf") or "inf"), max_error=float(one("max_error", "inf") or "inf"),
                offset=int(one("offset", "0")), limit=int(one("limit", "100")),
            )
        except ValueError as e:
            raise ConfigError(f"bad table query: {e}") from None
        if query.sort not in SORT_KEYS or query.status not in ("all", *(status.label for status in Status)):
            msg = f"bad table query: sort must be one of {', '.join(SORT_KEYS)}, status one of all, done, failed, pending"
            raise ConfigError(msg)
        if query.offset < 0 or not 1 <= query.limit <= 1000:
            msg = "bad table query: offset must be >= 0 and limit between 1 and 1000"
            raise ConfigError(msg)
        return query


class RunData:
    """The viewer's answers about one run directory, as JSON-ready values."""

    def __init__(self, run_dir: str | Path, data_root: Path | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.data_root = data_root
        self._archives = ArchiveMembers()  # images inside tar and parquet files: each archive indexed once
        with RunReader(self.run_dir) as run:  # a clear error now rather than at the first request
            folders = [run.settings.data.root, run.data_root(data_root), run.path.parent.parent]
        # longest first, so that a data root inside the run's parent folder is cut whole
        self._private_prefixes = sorted({_folder_prefix(form) for folder in folders for form in (folder.absolute(), folder.resolve())
                                         if len(form.parts) > 1}, key=len, reverse=True)
        self._run_scale: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def summary(self) -> dict[str, Any]:
        with RunReader(self.run_dir) as run:
            counts = {}
            for group in GROUPS:
                status = run.status(group)
                counts[group] = {code.label: int((status == code).sum()) for code in Status}
                counts[group]["total"] = len(status)
            attribution = run.settings.attribution.model_dump(mode="json")
            lut = colour_table()
            return {
                "run": run.path.parent.resolve().name,
                "model": _model_label(run.settings.model.name),
                "attribution": attribution,
                "counts": counts,
                "grid": list(run.grid),
                "n_prefix": run.n_prefix,
                "has_pair_maps": run.has_pair_maps,
                "stores_contributions": run.stores_contributions,
                "colormap": COLORMAP,
                "lut": ["#%02x%02x%02x" % tuple(int(c) for c in rgb) for rgb in lut],
            }

    def pairs(self, query: PairQuery) -> dict[str, Any]:
        with RunReader(self.run_dir) as run:
            status = run.status(PAIRS)
            captions = run.captions()
            caption_index = run.column(PAIRS, CAPTION_INDEX)
            numbers = run.finished_columns(PAIRS, PAIR_TABLE_NUMBERS, status)  # read once: filtered, sorted and shown
            score = numbers[SCORE]
            keep = np.ones(len(status), dtype=bool)
            if query.status != "all":
                keep &= status == Status[query.status.upper()]
            if query.text:
                needle = query.text.lower()
                holds = np.array([needle in text.lower() for text in captions], dtype=bool)
                keep &= holds[caption_index] if len(captions) else keep
            if math.isfinite(query.min_score) or math.isfinite(query.max_score):
                keep &= (score >= query.min_score) & (score <= query.max_score)
            if math.isfinite(query.max_error):
                keep &= numbers[RELATIVE_COMPLETENESS_ERROR] <= query.max_error
            chosen = np.flatnonzero(keep)
            if query.sort in ("caption", "image"):
                names = captions if query.sort == "caption" else run.image_paths()
                inputs = caption_index if query.sort == "caption" else run.column(PAIRS, IMAGE_INDEX)
                key = np.array([names[k].lower() for k in inputs[chosen]], dtype=object)
                order = np.argsort(key, kind="stable")
            elif query.sort == "index":
                order = np.arange(len(chosen))
            else:
                values = status if query.sort == "status" else numbers[query.sort]
                # unfinished pairs (NaN) sort last either way
                key = np.nan_to_num(values[chosen].astype(np.float64), nan=-np.inf if query.descending else np.inf)
                order = np.argsort(key, kind="stable")
            if query.descending:
                order = order[::-1]
            page = chosen[order][query.offset : query.offset + query.limit]
            rows = self._rows(run, page, status, numbers)
            return {"total": int(len(chosen)), "offset": query.offset, "rows": rows}

    def rows(self, indices: list[int]) -> list[dict[str, Any]]:
        """The table rows of the given pairs, in that order."""
        with RunReader(self.run_dir) as run:
            status = run.status(PAIRS)
            return self._rows(run, np.asarray(indices, dtype=np.int64), status, run.finished_columns(PAIRS, PAIR_TABLE_NUMBERS, status))

    def failures(self, limit: int = 1000) -> list[dict[str, Any]]:
        """Failed captions and images with their reasons (their pairs fail with them), then failed pairs
        whose inputs are fine."""
        with RunReader(self.run_dir) as run:
            found = []
            names = {"captions": run.captions(), "images": run.image_paths()}
            for group in GROUPS:
                failed = np.flatnonzero(run.status(group) == Status.FAILED)[:limit]
                for index, reason in zip(failed.tolist(), run.errors(group, failed.tolist())):
                    if group == PAIRS and reason.startswith(("caption ", "image ")):
                        continue  # listed under its input
                    item = self.public(names[group][index]) if group in names else f"pair {index}"
                    found.append({"group": group, "index": index, "item": item, "reason": self.public(reason)})
            return found[:limit]

    def pair(self, index: int) -> dict[str, Any]:
        """One finished pair: its map, tokens and numbers, and where its patches lie (its own rows only)."""
        with RunReader(self.run_dir) as run:
            c, i = _finished_pair_inputs(run, index)
            tokens = run.caption_tokens(c)
            geometry = run.preprocessing(i)
            numbers = {name: _number(run.value(PAIRS, name, index)) for name in PAIR_NUMBERS}
            bound, tolerance = float(run.value(PAIRS, MAP_ERROR_BOUND, index)), run.settings.attribution.tolerance
            caption_read, image_read = inputs_read_of_pair(run, index)
            # a summary run has no map: its page shows the pair's numbers and its tokens' summary instead
            interactions = run.interactions(index) if run.stores_contributions else None
            summary = {} if interactions is not None else {
                "token_table": _token_table(run.pair_summary(index), tokens.tokens, run.grid),
                "summary_note": self.public(needs_contributions_message(f"the map of pair {index}", run.path)),
            }
            return {
                "index": index,
                "caption": tokens.caption,
                "image": self.public(run.image_path(i)),
                "tokens": tokens.tokens,
                "chips": caption_chips(tokens),
                # exactly the stored values (None in a summary run)
                "interactions": None if interactions is None else interactions.astype(np.float64).tolist(),
                "map_peak": None if interactions is None else _token_map_peak(interactions, run.n_prefix),
                **summary,
                # what the model read: the caption up to read_end (the rest is in no map), the crop it saw
                "read_end": caption_read.read_end,
                "unread": caption_read.unread_text,
                "seen_share": image_read.seen_share,
                "input_notes": [self.public(note) for note in input_notes(caption_read, image_read)],
                "grid": list(run.grid),
                "n_prefix": run.n_prefix,
                "patches": _patch_rects_in_view(geometry),
                "crop_box": list(geometry.crop_box),
                "original_size": list(geometry.original_size),
                "terms": [float(v) for v in run.value(PAIRS, TERMS, index)],
                **numbers,
                "inexact_note": inexact_pair_note(bound) if is_inexact_pair(bound, tolerance) else None,
            }

    def image(self, index: int) -> tuple[bytes, bytes]:
        """The pair's image as the model saw it, at the page's size, and its contours (PNG with alpha)."""
        with RunReader(self.run_dir, archives=self._archives) as run:
            _, i = _finished_pair_inputs(run, index)
            geometry = run.preprocessing(i)
            view = geometry.model_view(read_image(self._archives.image(self._image_file(run, i, f" of pair {index}")))[0])
        width, height = view.size
        display = view.convert("RGB").resize((DISPLAY_SIDE, max(1, round(DISPLAY_SIDE * height / width))), Image.Resampling.BICUBIC)
        lines = np.zeros((display.size[1], display.size[0], 4), dtype=np.uint8)
        lines[outline_mask(display, geometry)] = (*CONTOUR, 255)
        return _png(display), _png(Image.fromarray(lines, mode="RGBA"))

    def thumbnail(self, image: int, version: str | None = None) -> bytes:
        """A finished image, whole and upright, at most ``THUMBNAIL_SIDE`` pixels a side (PNG).

        Args:
            version: the content key its address names (:func:`_image_version`); another one is not found,
                so that a browser never keeps this picture under another picture's address.
        """
        with RunReader(self.run_dir, archives=self._archives) as run:
            n_images = run.n_items(IMAGES)
            if not 0 <= image < n_images or run.value(IMAGES, STATUS, image) != Status.DONE:
                msg = f"image {image} is not a finished image of this run ({n_images} images)"
                raise NotFound(msg)
            if version is not None and version != _image_version(run.value(IMAGES, SHA256, image)):
                msg = f"image {image} is not the picture this address names: reload the page"
                raise NotFound(msg)
            source = self._archives.image(self._image_file(run, image))
        with Image.open(io.BytesIO(source.data) if isinstance(source, MemberBytes) else source) as opened:
            opened.draft("RGB", (THUMBNAIL_SIDE, THUMBNAIL_SIDE))  # a JPEG decodes at a fraction of its size: cheap
            picture = read_image(opened)[0]  # upright, over white, as the run read it
        picture.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.BICUBIC)
        return _png(picture)

    def _image_file(self, run: RunReader, image: int, owner: str = "") -> Path:
        """A finished image's file, checked: inside the data root (before the file is touched), then as
        :meth:`RunReader.image_source` checks it (``owner`` says whose image it is in the messages)."""
        root = run.data_root(self.data_root).resolve()
        stored = run.image_path(image)
        path = (root / stored).resolve()  # an absolute ``stored`` replaces the root; links are followed
        if not path.is_relative_to(root):
            msg = f"image {stored!r}{owner} lies outside the data root (through '..', an absolute path or a link): not served"
            raise OutsideDataRoot(msg)
        return run.image_source(image, root, owner=owner)

    def public(self, text: str) -> str:
        """``text`` without the machine's folders: the data root is cut (paths read relative to it, as the run
        stores them) and the run's parent folder too (the run by its name)."""
        for prefix in self._private_prefixes:
            text = text.replace(prefix, "")
        for prefix in self._private_prefixes:
            # reasons are cut to their column's width (a pair's to 100 bytes), which may end inside a folder
            start = text.find(prefix[:2])
            while start != -1 and not prefix.startswith(text[start:]):
                start = text.find(prefix[:2], start + 1)
            if start != -1:
                text = text[:start] + "…"
        return text

    def _rows(self, run: RunReader, pairs: np.ndarray, status: np.ndarray, numbers: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        """Table rows of ``pairs`` (``status`` and ``numbers``: every pair's, see :meth:`RunReader.finished_columns`):
        each column read once, whatever the number of rows."""
        captions, paths = run.captions(), run.image_paths()
        caption_index, image_index = run.column(PAIRS, CAPTION_INDEX), run.column(PAIRS, IMAGE_INDEX)
        errors = run.errors(PAIRS, pairs.tolist())
        thumbnails = _thumbnail_urls(run, image_index[pairs])
        return [
            {
                "index": int(p),
                "caption": captions[int(caption_index[p])],
                "image": self.public(paths[int(image_index[p])]),
                "image_index": int(image_index[p]),
                "thumbnail": thumbnails[int(image_index[p])],
                "status": Status(int(status[p])).label,
                **{name: _number(column[p]) for name, column in numbers.items()},
                "error": self.public(error),
            }
            for p, error in zip(pairs, errors)
        ]

    def run_scale(self) -> dict[str, Any]:
        """A scale shared by every pair: the largest magnitude of one token's patch map over up to 256
        finished pairs (all of them in smaller runs, evenly spread otherwise). Kept until more pairs finish: a
        run being written gets a scale of its newly finished pairs too."""
        with self._lock, RunReader(self.run_dir) as run:
            done = np.flatnonzero(run.status(PAIRS) == Status.DONE)
            if not run.stores_contributions:  # a summary run draws no maps
                return {"value": None, "pairs": 0, "finished": int(len(done))}
            if self._run_scale is None or self._run_scale["finished"] != len(done):
                sample = done if len(done) <= RUN_SCALE_SAMPLE else done[np.linspace(0, len(done) - 1, RUN_SCALE_SAMPLE).astype(int)]
                peak = max((_token_map_peak(run.interactions(int(p)), run.n_prefix) for p in sample), default=0.0)
                self._run_scale = {"value": peak or 1.0, "pairs": int(len(sample)), "finished": int(len(done))}
            return self._run_scale


def _finished_pair_inputs(run: RunReader, index: int) -> tuple[int, int]:
    """A finished pair's (caption index, image index); :class:`NotFound` for any other index."""
    n_pairs = run.n_items(PAIRS)
    if not 0 <= index < n_pairs or run.value(PAIRS, STATUS, index) != Status.DONE:
        msg = f"pair {index} is not a finished pair of this run ({n_pairs} pairs)"
        raise NotFound(msg)
    return run.pair_inputs(index)


def _image_version(sha256: bytes) -> str:
    """The part of an image's content digest that names its thumbnail's address."""
    return sha256.decode()[:16]


def _thumbnail_urls(run: RunReader, images: np.ndarray) -> dict[int, str | None]:
    """The thumbnail address of each of ``images`` (their digests in one read, whatever the number of rows);
    none for images not finished, whose content the run has not recorded yet."""
    status = run.status(IMAGES)
    distinct = np.unique(np.asarray(images, dtype=np.int64))
    done = distinct[status[distinct] == Status.DONE]
    versions = dict(zip(done.tolist(), map(_image_version, run.values(IMAGES, SHA256, done))))
    return {
        image: f"api/image/{image}/thumb.png?v={versions[image]}" if image in versions else None
        for image in distinct.tolist()
    }


def _folder_prefix(folder: Path) -> str:
    return str(folder).rstrip(os.sep) + os.sep


def _token_table(summary: PairSummary, tokens: list[str], grid: tuple[int, int]) -> list[dict[str, Any]]:
    """A summary run's pair page: per caption position its token and the facts of its
    :class:`~xclip.attribution.summary.TokenSummary`, with its share of the score (its value over the map's total)."""
    token = summary.token
    total = float(np.nansum(token.values))
    return [
        {
            "token": text,
            "value": _number(token.values[t]),
            "score_share": _number(token.values[t] / total) if total else None,
            "peak_patch": [int(token.peak_patch[t]) // grid[1], int(token.peak_patch[t]) % grid[1]] if token.peak_patch[t] >= 0 else None,
            "peak_value": _number(token.peak_value[t]),
            "top_share": _number(token.top_share[t]),
            "entropy": _number(token.entropy[t]),
            "centroid": [_number(v) for v in token.centroid[t]],
            "spread": _number(token.spread[t]),
        }
        for t, text in enumerate(tokens)
    ]


def _token_map_peak(interactions: np.ndarray, n_prefix: int) -> float:
    """The largest magnitude of one token's map over the patches (the viewer's run-wide scale)."""
    return float(np.abs(np.asarray(interactions)[:, n_prefix:]).max())


def _model_label(name: str) -> str:
    """A hub id as it is; a local checkpoint by its folder's name (the page is shared, the path is private)."""
    return f"local checkpoint {Path(name).name}" if looks_like_path(name) else name


def _patch_rects_in_view(geometry: Preprocessing) -> list[list[float]]:
    """Each patch's rectangle as fractions of the model's view (0..1 across the crop), row-major: the page
    draws and selects patches with these, and computes a box's coverage as :mod:`xclip.core.geometry` does."""
    x0, y0, x1, y1 = geometry.crop_box
    scale = np.array([x1 - x0, y1 - y0, x1 - x0, y1 - y0])
    return ((geometry.patch_rects() - np.array([x0, y0, x0, y0])) / scale).tolist()


def _number(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, "PNG", compress_level=3)
    return buffer.getvalue()


class _Handler(BaseHTTPRequestHandler):
    data: RunData  # set, with ``timeout``, on the subclass made by ``make_server``

    def do_GET(self) -> None:  # noqa: N802  (the standard library's name)
        try:
            path, query = self._own_target()
            parts = [p for p in path.split("/") if p]
            if not parts:
                self._file("index.html")
            elif len(parts) == 1 and parts[0] in ASSETS:
                self._file(parts[0])
            elif parts == ["favicon.ico"]:
                self._send(b"", "image/x-icon", HTTPStatus.NO_CONTENT)
            elif parts == ["data.js"]:  # the exported site's data; a live page asks the server instead
                self._send(b"window.XCLIP_STATIC = null;\n", "text/javascript")
            elif parts == ["api", "run"]:
                self._json(self.data.summary())
            elif parts == ["api", "pairs"]:
                self._json(self.data.pairs(PairQuery.from_params(parse_qs(query))))
            elif parts == ["api", "failures"]:
                self._json(self.data.failures())
            elif parts == ["api", "scale"]:
                self._json(self.data.run_scale())
            elif len(parts) == 3 and parts[:2] == ["api", "pair"]:
                self._json(self.data.pair(_index(parts[2])))
            elif len(parts) == 4 and parts[:2] == ["api", "pair"] and parts[3] in ("image.png", "contours.png"):
                image, contours = self.data.image(_index(parts[2]))
                self._send(image if parts[3] == "image.png" else contours, "image/png")
            elif len(parts) == 4 and parts[:2] == ["api", "image"] and parts[3] == "thumb.png":
                version = parse_qs(query).get("v", [""])[0]
                self._send(self.data.thumbnail(_index(parts[2]), version), "image/png", cache=THUMBNAIL_CACHE)
            else:
                self._json({"error": f"no such page: {path}"}, HTTPStatus.NOT_FOUND)
        except XclipError as e:
            status = {NotFound: HTTPStatus.NOT_FOUND, MissingImage: HTTPStatus.NOT_FOUND, OutsideDataRoot: HTTPStatus.FORBIDDEN,
                      Misdirected: HTTPStatus.MISDIRECTED_REQUEST}.get(type(e), HTTPStatus.BAD_REQUEST)
            self._json({"error": self.data.public(str(e))}, status)

    def _own_target(self) -> tuple[str, str]:
        """The path and query of a request for this server's own origin.

        A page of a site whose name was rebound to 127.0.0.1 (DNS rebinding) sends that name as ``Host``, and a
        request line may name an authority of its own (``GET http://evil.example/ HTTP/1.1``, which HTTP says
        outranks ``Host``): both must name this server, and ``Host`` must be sent once.

        Raises:
            Misdirected: either names another origin.
            ConfigError: the target is no page address (``*``, ``host:port``).
        """
        host, port = self.server.server_address[:2]
        names = (host, "localhost", "[::1]")  # loopback names only: a name that DNS answers could be rebound
        own = {f"{name}:{port}" for name in names} | (set(names) if port == 80 else set())  # browsers leave out :80
        refusal = f"this server answers only http://{host}:{port}/ and http://localhost:{port}/"
        hosts = self.headers.get_all("Host") or []
        if len(hosts) != 1 or hosts[0].lower() not in own:
            named = f"Host {hosts[0][:100]!r}" if len(hosts) == 1 else f"{len(hosts)} Host headers"
            raise Misdirected(f"{refusal}, not {named}")
        target = self.path.partition("#")[0]
        absolute = ABSOLUTE_FORM.fullmatch(target)
        if absolute:
            scheme, authority, target = absolute.groups()
            if scheme.lower() != "http" or authority.lower() not in own:
                raise Misdirected(f"{refusal}, not {scheme[:20]}://{authority[:100]}")
            target = target or "/"
        if not target.startswith("/"):
            raise ConfigError(f"not a page address: {self.path[:100]!r}")
        path, _, query = target.partition("?")
        return path, query

    def _file(self, name: str) -> None:
        self._send((STATIC / name).read_bytes(), ASSETS[name])

    def _json(self, value: Any, status: HTTPStatus = HTTPStatus.OK) -> None:
        self._send(json.dumps(value).encode(), "application/json", status)

    def _send(self, body: bytes, kind: str, status: HTTPStatus = HTTPStatus.OK, cache: str = "no-store") -> None:
        self.send_response(status)
        self.send_header("Content-Type", f"{kind}; charset=utf-8" if kind.startswith(("text", "application")) else kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)  # no-store by default: a live run changes between reloads
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # no line per request on the terminal


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client that left (a closed tab, a reload mid-image) or stalled past the timeout is no error of ours;
        # anything else is a bug, and its traceback is printed
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


def _index(text: str) -> int:
    """An index as the page writes it, a plain decimal: :class:`NotFound` for anything else. int() would also
    take " 7", "+7", "7_0", "007" (a second address of one thumbnail) and other scripts' digits, and refuses more
    than 4,300 digits with a ValueError."""
    if not re.fullmatch(rf"0|[1-9][0-9]{{0,{MAX_INDEX_DIGITS - 1}}}", text):
        shown = text if len(text) <= 40 else f"{text[:20]}…({len(text)} characters)"
        raise NotFound(f"not an index of this run: {shown!r}")
    return int(text)


def make_server(run_dir: str | Path, port: int = 8765, data_root: Path | None = None,
                socket_timeout: float = SOCKET_TIMEOUT_S) -> ThreadingHTTPServer:
    """A server for ``run_dir`` on 127.0.0.1:``port`` (0: any free port); ``serve_forever()`` runs it.

    Args:
        socket_timeout: seconds a client may stay silent mid-request, or not take the answer, before it is
            disconnected.
    """
    handler = type("Handler", (_Handler,), {"data": RunData(run_dir, data_root), "timeout": socket_timeout})
    try:
        return _Server(("127.0.0.1", port), handler)
    except OSError as e:
        msg = f"cannot serve on 127.0.0.1:{port} ({e.strerror}): choose another --port, or --port 0 for any free one"
        raise XclipError(msg) from None


def choose_pairs(data: RunData, pairs: list[int] | None, top: int, bottom: int) -> list[int]:
    """Pairs to export: the given ones, or the ``top`` and ``bottom`` finished pairs by score."""
    if pairs:
        return list(dict.fromkeys(pairs))
    best = data.pairs(PairQuery(sort="score", descending=True, status="done", limit=max(1, top)))["rows"][:top]
    worst = data.pairs(PairQuery(sort="score", descending=False, status="done", limit=max(1, bottom)))["rows"][:bottom]
    return list(dict.fromkeys([row["index"] for row in best + worst]))


def export_site(run_dir: str | Path, out: Path, pairs: list[int], data_root: Path | None = None) -> Path:
    """Write the viewer with the data of ``pairs`` into ``out``: ``out/index.html`` opens without a server, and
    ``out/thumbnails/`` holds the table's thumbnails, one file an image."""
    data = RunData(run_dir, data_root)
    details, images, contours = {}, {}, {}
    for index in pairs:
        details[index] = data.pair(index)
        image, lines = data.image(index)
        images[index] = "data:image/png;base64," + base64.b64encode(image).decode()
        contours[index] = "data:image/png;base64," + base64.b64encode(lines).decode()
    peak = max((_token_map_peak(d["interactions"], d["n_prefix"]) for d in details.values() if d["interactions"] is not None),
               default=1.0)
    rows = data.rows(pairs)
    out.mkdir(parents=True, exist_ok=True)
    _export_thumbnails(data, rows, out)
    site = {
        "summary": data.summary(), "rows": rows, "failures": data.failures(), "pairs": details, "images": images,
        "contours": contours, "scale": {"value": peak or 1.0, "pairs": len(pairs), "finished": len(pairs)},
    }
    for name in ASSETS:  # each written under a temporary name, then renamed: a full disk leaves an earlier site whole
        write_atomically(out / name, lambda temporary, name=name: shutil.copyfile(STATIC / name, temporary))
    write_text_atomically(out / "data.js", f"window.XCLIP_STATIC = {json.dumps(site)};\n")
    return out / "index.html"


def _export_thumbnails(data: RunData, rows: list[dict[str, Any]], out: Path) -> None:
    """Write the rows' thumbnails as files, once an image, and point the rows at them: a page opened from the
    file system loads them as any picture."""
    folder = out / "thumbnails"
    folder.mkdir(exist_ok=True)
    for image in sorted({row["image_index"] for row in rows if row["thumbnail"]}):
        thumbnail = data.thumbnail(image)
        write_atomically(folder / f"{image}.png", lambda temporary, thumbnail=thumbnail: temporary.write_bytes(thumbnail))
    for row in rows:
        if row["thumbnail"]:
            row["thumbnail"] = f"thumbnails/{row['image_index']}.png"
