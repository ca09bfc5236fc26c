"""``jaxckpt graph``: the tree of named edges drawn as SVG."""

import xml.etree.ElementTree as ET

import numpy as np
import optax

import jaxckpt as jc
from jaxckpt.tools import graph as _graph
from jaxckpt.tools.cli import main

SVG = "{http://www.w3.org/2000/svg}"


def seed_state():
    params = {"l1": {"kernel": np.ones((1, 5), np.float32), "bias": np.zeros(5, np.float32)}}
    return {
        "params": params,
        "opt_state": optax.adam(0.1).init(params),
        "step": 50,
        "iterator": {"pos": 3},
    }


def parse(path):
    root = ET.parse(path).getroot()
    assert root.tag == f"{SVG}svg"
    return root


def texts(root):
    return [t.text for t in root.iter(f"{SVG}text")]


def boxes(root):
    """(path, kind, x, y, w, h) of every node box."""
    out = []
    for g in root.iter(f"{SVG}g"):
        if g.get("class", "").startswith("node"):
            r = g.find(f"{SVG}rect")
            box = [float(r.get(k)) for k in ("x", "y", "width", "height")]
            out.append((g.get("data-path"), g.get("class").split()[1], *box))
    return out


def test_graph_draws_named_edges_leaves_and_slots(tmp_path, capsys):
    ckpt = jc.save(tmp_path / "ckpt-50", seed_state(), step=50)
    out = tmp_path / "graph.svg"
    assert main(["graph", ckpt, "-o", str(out)]) == 0
    assert capsys.readouterr().out == f"Wrote {out}: 9 leaves of {ckpt}\n"
    root = parse(out)
    words = texts(root)
    assert words[0] == f"{ckpt}  (step 50)"
    for edge in (
        "params",
        "l1",
        "kernel",
        "bias",
        "opt_state",
        "0",
        "1",
        "mu",
        "nu",
        "count",
        "step",
    ):
        assert edge in words, edge
    assert "ckpt-50: dict" in words and "ScaleByAdamState" in words and "EmptyState" in words
    assert words.count("(1, 5) float32") == 3 and words.count("(5,) float32") == 3
    assert "() int32" in words and "int = 50" in words and "int = 3" in words
    assert (
        words.count("slot of params/l1/kernel") == 2 and words.count("slot of params/l1/bias") == 2
    )
    drawn = boxes(root)
    leaves = {p for p, kind, *_ in drawn if kind in ("array", "value")}
    assert leaves == set(jc.open(ckpt).paths)
    # Every edge is labelled by its name on its way to the child's box.
    edges = {
        g.find(f"{SVG}title").text: g.find(f"{SVG}text").text
        for g in root.iter(f"{SVG}g")
        if g.get("class") == "edge"
    }
    assert edges["opt_state/0/mu (attribute)"] == "mu"
    assert edges["opt_state/0 (sequence index)"] == "0"
    assert edges["params/l1/kernel (dict key)"] == "kernel"
    # The picture reads: no two boxes overlap, and all lie inside the canvas.
    width, height = float(root.get("width")), float(root.get("height"))
    for i, (_, _, x, y, w, h) in enumerate(drawn):
        assert 0 <= x and x + w <= width and 0 <= y and y + h <= height
        for _, _, x2, y2, w2, h2 in drawn[i + 1 :]:
            assert x + w <= x2 or x2 + w2 <= x or y + h <= y2 or y2 + h2 <= y


def test_graph_escapes_names_and_folds_deep_subtrees(tmp_path, capsys):
    tree = {
        "a/b": np.ones(2, np.int8),
        "<x & y>": {"deep": {"w": np.ones(3, np.float32), "v": "text"}},
        "ints": {0: "zero"},
    }
    ckpt = jc.save(tmp_path / "ckpt", tree)
    svg, boxes, n = _graph.render(jc.open(ckpt))
    root = ET.fromstring(svg)
    words = texts(root)
    assert (boxes, n) == (8, 4)
    assert "a%2Fb" in words and "<x & y>" in words and "~i0" in words and "str = 'text'" in words
    svg, boxes, n = _graph.render(jc.open(ckpt), max_depth=1)
    words = texts(ET.fromstring(svg))
    assert (boxes, n) == (4, 4) and "deep" not in words
    assert "dict: 2 leaves, 12 B" in words and "dict: 1 leaf, 0 B" in words
    assert main(["graph", ckpt, "-o", "-", "--prefix", "<x & y>/deep"]) == 0
    words = texts(ET.fromstring(capsys.readouterr().out))
    assert "ckpt/<x & y>/deep: dict" in words and "w" in words and "a%2Fb" not in words


def test_graph_errors_name_the_fix(tmp_path, capsys):
    ckpt = jc.save(tmp_path / "ckpt", seed_state())
    assert main(["graph", ckpt, "-o", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"jaxckpt graph: error: graph writes SVG, but {str(tmp_path / 'g.png')!r} does not end in .svg. "
        f"Fix: `-o {tmp_path / 'g'}.svg` (for a PNG, convert it afterwards, e.g. "
        "`rsvg-convert out.svg -o out.png`).\n"
    )
    assert main(["graph", ckpt, "-o", str(tmp_path / "no" / "g.svg")]) == 2
    err = capsys.readouterr().err
    assert (
        f"Cannot write {tmp_path / 'no' / 'g.svg'}: the directory {tmp_path / 'no'} does not exist. Fix: create it first."
        in err
    )
    assert main(["graph", ckpt, "-o", str(tmp_path / "g.svg"), "--prefix", "params/l2"]) == 2
    err = capsys.readouterr().err
    assert (
        f"'params/l2' is not a path of the checkpoint {ckpt}. Fix: pick a prefix from `jaxckpt inspect {ckpt}`."
        in err
    )
    assert main(["graph", ckpt]) == 2
    assert "the following arguments are required: -o/--output" in capsys.readouterr().err
