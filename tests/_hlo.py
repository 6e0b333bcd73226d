"""Reading XLA's compiled HLO text: every collective, its replica groups, its shapes and names.

Shared by the tests that pin which collectives a layout's training step runs
(``test_parallel_train_step``) and what they cost (``test_costs``).
"""

import re

import numpy as np

_HLO_OP = re.compile(
    r"^\s*(?:ROOT )?%\S+ = (?P<type>.+?) (?P<op>all-gather|all-reduce|reduce-scatter|all-to-all|"
    r"ragged-all-to-all|collective-permute|collective-broadcast|send|recv)(?P<async>-start|-done)?"
    r"\((?P<rest>.*)$"
)


def _iota(dims, perm=None):
    ids = np.arange(int(np.prod(dims))).reshape(dims)
    return ids.transpose(perm) if perm else ids


def _ints(s):
    return [int(x) for x in s.split(",") if x]


def hlo_replica_groups(rest, n_devices):
    """Replica groups of a compiled collective, in any of the forms XLA prints:
    ``{{0,1},{2,3}}``, iota ``[2,2]<=[4]`` / ``[2,2]<=[2,2]T(1,0)``, and mesh axes
    ``mesh['axis_0'=2,'axis_1'=2] {'axis_1'}`` (optionally ``, device_ids=([2,2]T(1,0))``)."""
    m = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", rest)
    if m:
        groups = [_ints(g) for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
        return frozenset(frozenset(g) for g in groups) if groups else frozenset([frozenset(range(n_devices))])
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", rest)
    if m:
        ids = _iota(_ints(m.group(3)), _ints(m.group(4)) if m.group(4) else None)
        return frozenset(frozenset(g) for g in ids.reshape(int(m.group(1)), int(m.group(2))).tolist())
    m = re.search(
        r"replica_groups=mesh\[([^\]]*)\]"
        r"(?:, device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))? \{([^}]*)\}",
        rest,
    )
    assert m, f"replica groups in a form this test does not read: {rest[:300]}"
    axes = re.findall(r"'(\w+)'=(\d+)", m.group(1))
    assert len(axes) == m.group(1).count("="), f"mesh axes this test does not read: {m.group(1)}"
    names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
    devices = (
        _iota(_ints(m.group(2)), _ints(m.group(3)) if m.group(3) else None).reshape(-1)
        if m.group(2)
        else np.arange(int(np.prod(sizes)))
    )
    reduced = re.findall(r"'(\w+)'", m.group(4))
    assert reduced and set(reduced) <= set(names), m.group(0)
    order = [names.index(a) for a in names if a not in reduced] + [names.index(a) for a in reduced]
    grid = devices.reshape(sizes).transpose(order)
    group_size = int(np.prod([sizes[names.index(a)] for a in reduced]))
    return frozenset(frozenset(g) for g in grid.reshape(-1, group_size).tolist())


def hlo_collectives(text, n_devices):
    """[(opcode, replica groups, result shapes, op_name)] for every collective in the module."""
    found = []
    for line in text.splitlines():
        m = _HLO_OP.match(line)
        if not m:
            assert not re.search(
                r" (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
                r"(-start|-done)?\(",
                line,
            ), f"a collective this test does not read: {line[:200]}"
            continue
        if m.group("async") == "-done":  # the end of an asynchronous collective: counted at its -start
            continue
        shapes = [tuple(_ints(d)) for d in re.findall(r"\b[a-z]+\d*\[([\d,]*)\]", m.group("type"))]
        op_name = re.search(r'op_name="([^"]*)"', m.group("rest"))
        found.append(
            (m.group("op"), hlo_replica_groups(m.group("rest"), n_devices), shapes, op_name.group(1) if op_name else "")
        )
    return found


_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}


def hlo_collectives_typed(text, n_devices):
    """[(opcode, replica groups, [(bytes per element, shape)], [op_name per result])] for every collective.

    A collective XLA merged from several (a tuple all-reduce) names its parts
    ``prefix/(a:b:c)``; each result gets ``prefix/a``, ``prefix/b``, ...
    """
    found = []
    for line in text.splitlines():
        m = _HLO_OP.match(line)
        if not m or m.group("async") == "-done":
            continue
        parts = [(_BYTES[t], tuple(_ints(d))) for t, d in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", m.group("type"))]
        name = re.search(r'op_name="([^"]*)"', m.group("rest"))
        name = name.group(1) if name else ""
        merged = re.match(r"(.*/)\(([^()]*)\)$", name)
        names = [merged.group(1) + n for n in merged.group(2).split(":")] if merged else [name] * len(parts)
        assert len(names) == len(parts), f"{len(parts)} results but names {names}"
        found.append((m.group("op"), hlo_replica_groups(m.group("rest"), n_devices), parts, names))
    return found
