"""The object graph of a checkpoint as an SVG picture (``jaxckpt graph``).

The tree of named edges is drawn left to right: one box per inner node (its container type or
class), one per leaf (its shape and dtype), and each edge labelled with its name. An optimizer
slot (``opt_state/0/mu/params/l1/kernel``) is drawn dashed and names the variable it belongs
to (``params/l1/kernel``), as in TensorFlow's checkpoint guide. Hand-written SVG: no graphviz.
"""

from __future__ import annotations

import dataclasses
import math
import os
from xml.sax.saxutils import escape, quoteattr

import numpy as np

from jaxckpt.checkpoint.reader import Reader
from jaxckpt.format import metadata as _metadata
from jaxckpt.format import paths as _paths
from jaxckpt.format.metadata import Record
from jaxckpt.tools.scan import human_bytes

FONT = 12  # px, monospace: every character is CHAR px wide
CHAR = 7.4
ROW = 26
BOX_H = 18
PAD = 6
GAP = 12  # from a box to its children's trunk
MARGIN = 16
HEADER = 34

_FILL = {
    "node": "#e8eef8",
    "obj": "#fdebd3",
    "array": "#e3f2e1",
    "value": "#fff6cc",
    "state": "#efe0f7",
    "fold": "#eeeeee",
}


@dataclasses.dataclass
class _Node:
    label: str
    kind: str  # a key of _FILL
    edge: str = ""  # the name of the edge into this node
    edge_kind: str = ""
    path: str = ""
    note: str = ""  # shown in grey after a leaf's box
    children: list[_Node] = dataclasses.field(default_factory=list)
    depth: int = 0
    x: float = 0.0
    y: float = 0.0


def _short(cls: str) -> str:
    return cls.rsplit(".", 1)[-1]


def _leaf(rec: Record) -> tuple[str, str]:
    if rec["t"] == "array":
        shape = (
            "(" + ", ".join(map(str, rec["shape"])) + ("," if len(rec["shape"]) == 1 else "") + ")"
        )
        return f"{shape} {rec['dtype']}", "array"
    if rec["t"] == "state":
        return f"state of {_short(rec.get('cls', 'object'))}", "state"
    value = repr(rec["v"]) if rec["py"] != "bytes" else "bytes"
    return (
        f"{rec['py']} = {value}" if len(value) <= 24 else f"{rec['py']} = {value[:21]}..."
    ), "value"


def _count(node: Record) -> tuple[int, int]:
    """(leaves, bytes of array data) under a structure record."""
    if node["t"] in _metadata.LEAF_KINDS:
        size = (
            math.prod(node["shape"]) * np.dtype(node["dtype"]).itemsize
            if node["t"] == "array"
            else 0
        )
        return 1, size
    n = b = 0
    for _, _, child in node["c"]:
        cn, cb = _count(child)
        n, b = n + cn, b + cb
    return n, b


def _build(
    rec: Record, name: str, kind: str, path: str, depth: int, max_depth: int | None
) -> _Node:
    t = rec["t"]
    if t in _metadata.LEAF_KINDS:
        label, k = _leaf(rec)
        return _Node(label, k, name, kind, path, depth=depth)
    label = _short(rec["cls"]) if t == "obj" else ("None" if t == "none" else t)
    if max_depth is not None and depth >= max_depth and rec["c"]:
        n, size = _count(rec)
        return _Node(
            f"{label}: {n} {'leaf' if n == 1 else 'leaves'}, {human_bytes(size)}",
            "fold",
            name,
            kind,
            path,
            depth=depth,
        )
    node = _Node(label, "obj" if t == "obj" else "node", name, kind, path, depth=depth)
    for ekind, key, child in rec["c"]:
        cname = _paths.name_of(ekind, key)
        node.children.append(
            _build(child, cname, ekind, f"{path}/{cname}" if path else cname, depth + 1, max_depth)
        )
    return node


def _walk(node: _Node) -> list[_Node]:
    out = [node]
    for c in node.children:
        out += _walk(c)
    return out


def _mark_slots(nodes: list[_Node]) -> None:
    """Notes on each optimizer slot the variable it belongs to.

    A slot is an array leaf ``opt_state/0/mu/l1/kernel`` whose trailing edges name a variable
    of the same shape in another top-level subtree: ``params/l1/kernel`` (whole path) or
    ``l1/kernel`` below its first edge. Ambiguous owners are not marked.
    """
    owners: dict[str, list[_Node]] = {}
    arrays = [n for n in nodes if n.kind == "array" and "/" in n.path]
    for n in arrays:
        for key in {n.path, n.path.split("/", 1)[1]}:
            owners.setdefault(key, []).append(n)
    for n in arrays:
        top, parts = n.path.split("/", 1)[0], n.path.split("/")
        for i in range(1, len(parts)):
            found = [
                q
                for q in owners.get("/".join(parts[i:]), [])
                if q.path.split("/", 1)[0] != top and q.label == n.label
            ]
            if found:
                if len({q.path for q in found}) == 1:
                    n.note = f"slot of {found[0].path}"
                break


def _text_w(s: str) -> float:
    return len(s) * CHAR


def _layout(root: _Node, top: float) -> tuple[float, float]:
    nodes = _walk(root)
    depth = max(n.depth for n in nodes)
    box = [0.0] * (depth + 1)  # widest inner box per column
    label = [0.0] * (depth + 1)  # widest edge label into each column
    for n in nodes:
        if n.children:
            box[n.depth] = max(box[n.depth], _text_w(n.label) + 2 * PAD)
        label[n.depth] = max(label[n.depth], _text_w(n.edge) + 2 * PAD)
    col = [float(MARGIN)]
    for d in range(depth):
        col.append(col[d] + box[d] + GAP + max(label[d + 1], 2 * PAD))
    row = 0

    def place(n: _Node) -> None:
        nonlocal row
        n.x = col[n.depth]
        if not n.children:
            n.y = top + row * ROW + ROW / 2
            row += 1
            return
        for c in n.children:
            place(c)
        n.y = (n.children[0].y + n.children[-1].y) / 2

    place(root)
    width = max(
        n.x + _text_w(n.label) + 2 * PAD + (_text_w(n.note) + 10 if n.note else 0) for n in nodes
    )
    return width + MARGIN, top + row * ROW + MARGIN / 2


def _svg(root: _Node, title: str, size: tuple[float, float]) -> str:
    w, h = size
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0f}" height="{h:.0f}" '
        f'viewBox="0 0 {w:.0f} {h:.0f}" font-family="DejaVu Sans Mono, Menlo, Consolas, monospace" '
        f'font-size="{FONT}">',
        f"<title>{escape(title)}</title>",
        f'<rect width="{w:.0f}" height="{h:.0f}" fill="white"/>',
        f'<text x="{MARGIN}" y="{MARGIN + 6}" font-weight="bold">{escape(title)}</text>',
    ]
    nodes = _walk(root)
    for n in nodes:
        if not n.children:
            continue
        right = n.x + _text_w(n.label) + 2 * PAD
        trunk = max(c.x for c in n.children) - max(_text_w(c.edge) + 2 * PAD for c in n.children)
        trunk = min(trunk, n.children[0].x - 2 * PAD)
        ys = [c.y for c in n.children]
        out.append(f'<path d="M{right:.1f},{n.y:.1f} H{trunk:.1f}" stroke="#888" fill="none"/>')
        out.append(
            f'<path d="M{trunk:.1f},{min(ys):.1f} V{max(ys):.1f}" stroke="#888" fill="none"/>'
        )
        for c in n.children:
            dash = ' stroke-dasharray="4,3"' if c.note else ""
            out.append(f'<g class="edge"><title>{escape(c.path)} ({_KIND[c.edge_kind]})</title>')
            out.append(
                f'<path d="M{trunk:.1f},{c.y:.1f} H{c.x:.1f}" stroke="#888" fill="none"{dash}/>'
            )
            out.append(
                f'<text x="{trunk + PAD:.1f}" y="{c.y - 4:.1f}" fill="#1a4d8f">{escape(c.edge)}</text></g>'
            )
    for n in nodes:
        bw = _text_w(n.label) + 2 * PAD
        dash = ' stroke-dasharray="4,3"' if n.note else ""
        out.append(
            f'<g class="node {n.kind}" data-path={quoteattr(n.path)}>'
            f'<rect x="{n.x:.1f}" y="{n.y - BOX_H / 2:.1f}" width="{bw:.1f}" height="{BOX_H}" rx="4" '
            f'fill="{_FILL[n.kind]}" stroke="#666"{dash}/>'
            f'<text x="{n.x + PAD:.1f}" y="{n.y + FONT / 2 - 2:.1f}">{escape(n.label)}</text>'
        )
        if n.note:
            out.append(
                f'<text x="{n.x + bw + 8:.1f}" y="{n.y + FONT / 2 - 2:.1f}" fill="#888">{escape(n.note)}</text>'
            )
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


_KIND = {
    "": "root",
    "d": "dict key",
    "i": "int dict key",
    "s": "sequence index",
    "a": "attribute",
    "f": "flattened index",
}


def render(
    reader: Reader, *, prefix: str | None = None, max_depth: int | None = None
) -> tuple[str, int, int]:
    """The SVG text of the checkpoint's tree of named edges, the boxes it draws, its leaves.

    Args:
        reader: the opened checkpoint (``jc.open(path)``).
        prefix: draw only the subtree at this path (``"params"``).
        max_depth: fold every subtree deeper than this into one box that counts its leaves.
    """
    rec = reader.structure
    base = (prefix or "").strip("/")
    for part in [p for p in base.split("/") if p]:
        kids = {_paths.name_of(k, key): c for k, key, c in rec.get("c", [])}
        if part not in kids:
            raise ValueError(
                f"{base!r} is not a path of the checkpoint {reader.path}. Fix: pick a prefix from `jaxckpt inspect {reader.path}`."
            )
        rec = kids[part]
    name = os.path.basename(reader.path.rstrip("/")) + (f"/{base}" if base else "")
    root = _build(rec, "", "", base, 0, max_depth)
    root.label = f"{name}: {root.label}"
    nodes = _walk(root)
    _mark_slots(nodes)
    step = reader.metadata.get("step")
    title = f"{reader.path}" + (f"  (step {step})" if step is not None else "")
    size = _layout(root, HEADER)
    return _svg(root, title, size), len(nodes), _count(rec)[0]
