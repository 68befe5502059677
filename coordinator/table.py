"""The bucket -> node ownership table, computed identically by every node.

Every node sees every packet sent to the VIP and keeps only those whose jhash
bucket (0..B-1) it owns. There is no central allocator: each node runs
``rebalance`` on the same inputs (the previous table and the etcd member
list) and must reach the same answer, so everything here is a pure function
of its arguments, iterated in node-id / bucket order and never in dict
insertion order. Exact arithmetic (``Fraction``) keeps float rounding from
ever making two nodes disagree.

``rebalance`` guarantees, for every call:

* balance: each member holds floor(s) or ceil(s) buckets, where
  s = B * weight / total weight is its exact share, and every bucket is owned.
  Weight 0 is a standby: it holds nothing while any member has weight > 0;
  if every member is a standby they all serve with equal weight.
* minimal movement: among all balanced tables it returns one that changes the
  owner of as few buckets as possible. Consequences: a leave only hands out the
  leaver's buckets, and a join only feeds the newcomer (or other members that
  held nothing), except in the rare cases where balance itself forces a move
  between two serving members (see ``rebalance``). Connections in buckets that
  keep their owner are untouched.
* contiguity: buckets change hands in runs, so each node's buckets form few
  ranges and its nftables interval set stays small.
"""
from __future__ import annotations

import base64
import binascii
import sys
import zlib
from array import array
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from math import ceil, floor

MIN_BUCKETS = 64
MAX_BUCKETS = 65536
# Index stored in the encoded owner array for an unowned bucket.
_UNOWNED = 0xFFFF

Table = list[str | None]


def validate_bucket_count(b: object) -> int:
    """Return ``b`` if it is a legal bucket count, else raise ``ValueError``.

    B is the ``mod`` of the kernel's jhash expression and the length of every
    table; the power-of-two bound keeps the encoded table within 16-bit indexes
    and the work per rebalance bounded.
    """
    if (isinstance(b, bool) or not isinstance(b, int)
            or not MIN_BUCKETS <= b <= MAX_BUCKETS or b & (b - 1)):
        raise ValueError(f"buckets must be a power of two from 64 to 65536, got {b!r}")
    return b


def _effective_weights(members: object) -> dict[str, int]:
    """Validated weights, sorted by node id, with the all-standby rule applied."""
    if not isinstance(members, Mapping):
        raise ValueError(f"members must be a mapping of node id -> weight, "
                         f"got {type(members).__name__}")
    weights: dict[str, int] = {}
    for node in sorted(members, key=_id_sort_key):
        weight = members[node]
        if not isinstance(node, str) or not node:
            raise ValueError(f"member ids must be non-empty strings, got {node!r}")
        if isinstance(weight, bool) or not isinstance(weight, int):
            raise ValueError(f"weight of member {node!r} must be an integer, got {weight!r}")
        if weight < 0:
            raise ValueError(f"weight of member {node!r} must be >= 0, got {weight}")
        weights[node] = weight
    if weights and not any(weights.values()):
        # Only standbys are left: they serve rather than let traffic drop.
        weights = dict.fromkeys(weights, 1)
    return weights


def _id_sort_key(node: object) -> tuple[str, str]:
    # Sorting must not blow up on a bad id before validation can name it.
    return (type(node).__name__, node if isinstance(node, str) else repr(node))


def _usable_previous(previous: object, buckets: int) -> Sequence[str | None] | None:
    """``previous`` if it can seed this rebalance, ``None`` for a fresh start."""
    if previous is None:
        return None
    if isinstance(previous, (str, bytes)) or not isinstance(previous, Sequence):
        raise ValueError(f"previous must be a list of owners or None, "
                         f"got {type(previous).__name__}")
    if len(previous) != buckets:
        # A table for another B says nothing about this one's buckets.
        return None
    for b, owner in enumerate(previous):
        if owner is not None and not isinstance(owner, str):
            raise ValueError(f"previous[{b}] must be a node id or None, got {owner!r}")
    return previous


def rebalance(previous: list[str | None] | None, members: dict[str, int],
              buckets: int) -> list[str | None]:
    """The next table: balanced for ``members``, moving as few buckets as possible.

    ``previous`` is the table in force (one owner per bucket, ``None`` for
    unowned) or ``None`` for a first table; one of the wrong length is treated
    as ``None``. Buckets of ``previous`` owned by ``None`` or by a node that is
    no longer a member are orphans and always get a new owner. Returns a new
    list and never mutates its arguments.

    How (each step exists for an invariant):

    1. Exact shares s_i = B * w_i / W give each member a legal range
       [lo_i, hi_i] = [floor(s_i), ceil(s_i)]. sum(lo) <= B <= sum(hi).
    2. Target t_i = k_i (what it holds now) clamped into its range: a member
       already inside its range keeps its count, so nothing moves needlessly.
    3. Fix the sum to B, one step per member (hi - lo <= 1), moving counts
       only where that costs the fewest moves:

       * too many: lower members sitting at hi > lo, smallest fractional share
         first. Members that are receiving (t_i > k_i) were clamped up to lo,
         so they are never at hi and lowering always makes a holder release.
       * too few: raise members sitting at lo < hi, preferring
         (a) members that release (k_i > t_i): one release fewer, no move;
         (b) members already receiving (k_i < t_i): no new node starts
         receiving;
         (c) members holding nothing, such as a newcomer;
         (d) the rest; within a class largest fractional share first.

       Class (c) is not in the original design, which ranked it with (d).
       The sequence property test found why it is needed: at B=64, joins of
       a:846, b:357, then c:1 give c a share of 0.05 (lo 0, hi 1); a must
       drop from 46 to 45 and b (share 18.97, holding 18) outranked c on
       fractional share, so a's bucket went to b although the newcomer could
       legally take it. Both cost one move, but preferring the member that
       holds nothing keeps "a join only feeds the newcomer". (rebalance cannot
       tell a newcomer from an old member that holds nothing: both just hold
       no bucket of ``previous``, so those are fed alike.)
    4. Members with k_i > t_i release their highest-numbered buckets. The pool
       (orphans + released, ascending) is dealt out in consecutive runs to the
       receivers in node-id order, so ranges stay contiguous.

    The result is optimal: every member ends in its legal range and the number
    of moved buckets is max(sum max(0, lo_i - k_i), orphans + sum max(0, k_i -
    hi_i)), a lower bound for any balanced table.

    That bound can exceed what a leave orphans: survivors already at the
    ceiling of their new share may outnumber the spare remainder while
    another survivor is still below the floor of its own, so a survivor must
    hand it a bucket. Likewise on a join, old members may sit more buckets
    above their new ceilings than the members holding nothing may take, so
    an old member must receive one. Sticky counts make both reachable from a
    first table (the unit tests pin one sequence of each); no balanced table
    avoids them. There strict balance wins over "only the leaver's buckets
    move", with as few such moves as possible.
    """
    buckets = validate_bucket_count(buckets)
    weights = _effective_weights(members)
    prev = _usable_previous(previous, buckets)
    if not weights:
        return [None] * buckets
    ids = list(weights)  # sorted by _effective_weights
    total = sum(weights.values())

    share = {n: Fraction(buckets * weights[n], total) for n in ids}
    lo = {n: floor(share[n]) for n in ids}
    hi = {n: ceil(share[n]) for n in ids}
    frac = {n: share[n] - lo[n] for n in ids}

    held: dict[str, list[int]] = {n: [] for n in ids}
    orphans: list[int] = []
    for b, owner in enumerate(prev if prev is not None else [None] * buckets):
        if owner in held:
            held[owner].append(b)  # ascending, since b is
        else:
            orphans.append(b)
    have = {n: len(held[n]) for n in ids}
    target = {n: min(max(have[n], lo[n]), hi[n]) for n in ids}

    # Each candidate moves by exactly one and then leaves the candidate set
    # without changing anyone else's class, so one sort replaces the loop.
    excess = sum(target.values()) - buckets
    if excess > 0:
        down = sorted((n for n in ids if target[n] == hi[n] > lo[n]),
                      key=lambda n: (frac[n], n))
        for n in down[:excess]:
            target[n] -= 1
    elif excess < 0:
        def raise_class(n: str) -> int:
            if have[n] > target[n]:
                return 0
            if have[n] < target[n]:
                return 1
            return 2 if have[n] == 0 else 3

        up = sorted((n for n in ids if target[n] == lo[n] < hi[n]),
                    key=lambda n: (raise_class(n), -frac[n], n))
        for n in up[:-excess]:
            target[n] += 1
    # sum(lo) <= B <= sum(hi) guarantees enough candidates.
    assert sum(target.values()) == buckets

    pool = list(orphans)
    for n in ids:
        surplus = have[n] - target[n]
        if surplus > 0:
            pool.extend(held[n][-surplus:])
    pool.sort()

    table: Table = list(prev) if prev is not None else [None] * buckets
    pos = 0
    for n in ids:
        need = target[n] - have[n]
        if need > 0:
            for b in pool[pos:pos + need]:
                table[b] = n
            pos += need
    # received - released == orphans, so the pool is dealt out exactly.
    assert pos == len(pool)
    return table


def owned_buckets(table: Sequence[str | None], node_id: str) -> list[int]:
    """The buckets ``node_id`` owns in ``table``, ascending."""
    return [b for b, owner in enumerate(table) if owner == node_id]


def bucket_ranges(buckets: Iterable[int]) -> list[tuple[int, int]]:
    """Merge bucket numbers into sorted inclusive ranges: [0,1,2,5] -> [(0,2),(5,5)].

    This is the shape of an nftables interval set; duplicates are ignored.
    """
    ranges: list[tuple[int, int]] = []
    for b in sorted(set(buckets)):
        if ranges and b == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], b)
        else:
            ranges.append((b, b))
    return ranges


def counts(table: Sequence[str | None]) -> dict[str, int]:
    """Buckets per owner (unowned buckets are not counted), keyed in id order."""
    tally: dict[str, int] = {}
    for owner in table:
        if owner is not None:
            tally[owner] = tally.get(owner, 0) + 1
    return dict(sorted(tally.items()))


def moved(old: Sequence[str | None], new: Sequence[str | None]) -> int:
    """How many buckets have a different owner in ``new`` than in ``old``."""
    if len(old) != len(new):
        raise ValueError(f"tables differ in length: {len(old)} and {len(new)} buckets")
    return sum(1 for a, b in zip(old, new) if a != b)


def encode_owners(table: Sequence[str | None]) -> dict:
    """A compact JSON-able form of ``table`` for storing in etcd.

    ``{"nodes": sorted distinct ids, "owners": base64(zlib(uint16 LE indexes))}``
    with 0xFFFF for an unowned bucket. Tables are long runs of one owner, so
    zlib shrinks a 4096-bucket table to a few dozen bytes.
    """
    validate_bucket_count(len(table))
    for b, owner in enumerate(table):
        if owner is not None and (not isinstance(owner, str) or not owner):
            raise ValueError(f"table[{b}] must be a node id or None, got {owner!r}")
    nodes = sorted({owner for owner in table if owner is not None})
    # Cannot trigger with B <= 65536 (at most B distinct owners), but keeps
    # the 0xFFFF sentinel unambiguous if the limits ever change.
    if len(nodes) >= _UNOWNED:
        raise ValueError(f"too many distinct owners to encode: {len(nodes)}")
    index = {node: i for i, node in enumerate(nodes)}
    raw = array("H", (_UNOWNED if owner is None else index[owner] for owner in table))
    if sys.byteorder != "little":
        raw.byteswap()
    packed = zlib.compress(raw.tobytes(), 9)
    return {"nodes": nodes, "owners": base64.b64encode(packed).decode("ascii")}


def decode_owners(d: object, *, buckets: int | None = None) -> list[str | None]:
    """The table ``encode_owners`` encoded; ``ValueError`` naming the problem otherwise.

    The input comes from etcd, so it is validated completely before anything
    is returned: a node must never act on half a table. ``buckets``, if given,
    is the B the caller expects. Only the canonical form ``encode_owners``
    writes is accepted.
    """
    if buckets is not None:
        validate_bucket_count(buckets)
    if not isinstance(d, Mapping):
        raise ValueError(f"encoded owners must be a mapping, got {type(d).__name__}")
    if set(d) != {"nodes", "owners"}:
        raise ValueError(f"encoded owners must have exactly the keys 'nodes' and 'owners', "
                         f"got {sorted(map(str, d))}")
    nodes, owners = d["nodes"], d["owners"]
    if not isinstance(nodes, list) or not all(isinstance(n, str) and n for n in nodes):
        raise ValueError("encoded owners: 'nodes' must be a list of non-empty strings")
    if any(a >= b for a, b in zip(nodes, nodes[1:])):
        raise ValueError("encoded owners: 'nodes' must be sorted and without duplicates")
    if not isinstance(owners, str):
        raise ValueError("encoded owners: 'owners' must be a base64 string")

    try:
        packed = base64.b64decode(owners.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError(f"encoded owners: 'owners' is not valid base64 ({exc})") from None

    # Bounded decompression: a hostile value must not inflate without limit.
    # One byte over the largest legal table, so hitting the cap means too big.
    limit = 2 * MAX_BUCKETS + 1
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(packed, limit)
        if inflater.unconsumed_tail:
            raise ValueError(f"encoded owners: 'owners' inflates to more than "
                             f"{limit - 1} bytes")
        raw += inflater.flush()
    except zlib.error as exc:
        raise ValueError(f"encoded owners: 'owners' is not valid zlib data ({exc})") from None
    if not inflater.eof:
        raise ValueError("encoded owners: 'owners' zlib stream is truncated")
    if inflater.unused_data:
        raise ValueError("encoded owners: 'owners' has data after the zlib stream")
    if len(raw) % 2:
        raise ValueError(f"encoded owners: odd byte length {len(raw)}, expected 2 per bucket")

    count = len(raw) // 2
    if buckets is not None and count != buckets:
        raise ValueError(f"encoded owners: table has {count} buckets, expected {buckets}")
    try:
        validate_bucket_count(count)
    except ValueError as exc:
        raise ValueError(f"encoded owners: {exc}") from None

    indexes = array("H")
    indexes.frombytes(raw)
    if sys.byteorder != "little":
        indexes.byteswap()
    used: set[int] = set()
    for b, i in enumerate(indexes):
        if i != _UNOWNED:
            if i >= len(nodes):
                raise ValueError(f"encoded owners: bucket {b} names node index {i}, "
                                 f"but only {len(nodes)} nodes are listed")
            used.add(i)
    if len(used) != len(nodes):
        unused = [nodes[i] for i in range(len(nodes)) if i not in used]
        raise ValueError(f"encoded owners: listed nodes own no bucket: {unused}")
    return [None if i == _UNOWNED else nodes[i] for i in indexes]
