"""`arc` (Adaptive Replacement Cache) and `mrs` (HybriMoE's minus recent score): hand-computed
decisions on tiny traces, bad knobs, and end-to-end runs through `sim.run`."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

import sim
from policies.base import Context
from policies.cache import arc as arc_mod
from policies.registry import CACHE
from sim.engine.cache import ExpertCache
from sim.errors import UserError
from sim.trace.synthetic import random_trace
from tests.cache_protocol import check_victims_against_ranking
from tests.engine_helpers import hw, preset, trace

#: a tiny model's shape for `sim.run` on a synthetic trace (as tests/test_locality.py)
MODEL = {"model.heads": 8, "model.kv_heads": 8, "model.head_dim": 128, "model.vocab": 1000, "model.hidden": 256,
         "model.expert_width": 512, "model.bits": 16, "model.attn_bits": 16}


def ctx_for(tr, slots):
    pre = preset(tr.model.layers, tr.model.experts, tr.model.top_k)
    cache = ExpertCache(tr.model.layers, tr.model.experts, slots * pre.expert_bytes)
    return Context(trace=tr, preset=pre, cache=cache, capacity_slots=slots, rng=np.random.default_rng(0), hw=hw())


def make(name, ctx, **knobs):
    return CACHE.get(name)(CACHE.knobs(name, knobs), ctx)


def miss(ctx, pol, key, t, layer=None):
    """The engine's protocol for a demand miss: victims, evictions, the insert, then the use once
    loaded. Returns the victims."""
    eb = ctx.preset.expert_bytes
    layer = key // ctx.experts if layer is None else layer
    out = pol.victims(key, eb, t, layer)
    assert out is not None
    for v in out:
        ctx.cache.evict(v)
        pol.on_evict(v)
    ctx.cache.begin_load(key, eb)
    pol.on_insert(key, t)
    ctx.cache.finish_load(key)
    pol.on_access(key, t)
    return out


def lists(pol, scope=0):
    s = pol.scopes[scope]
    return list(s.t1), list(s.t2), list(s.b1), list(s.b2)


# ------------------------------------------------------------------------------------ arc


def test_arc_differs_from_lru_and_p_adapts():
    """c = 2 slots, one layer; requests A A B C B A (A=0, B=1, C=2)."""
    tr = trace([[[0]]] * 6, 1, 4)
    ctx, ctx_lru = ctx_for(tr, 2), ctx_for(tr, 2)
    arc, lru = make("arc", ctx), make("lru", ctx_lru, scope="layer")
    A, B, C = 0, 1, 2
    for pol, c in ((arc, ctx), (lru, ctx_lru)):
        assert miss(c, pol, A, 0) == []  # room: T1 = [A]
        pol.on_access(A, 1)  # a hit: T1 -> T2 = [A]
        assert miss(c, pol, B, 2) == []  # T1 = [B]
    assert lists(arc) == ([B], [A], [], []) and arc.scopes[0].p == 0
    # t3, C: REPLACE(C, p=0): |T1| = 1 > p -> T1's LRU, B (seen once). LRU evicts A (used at t1 < t2).
    assert miss(ctx_lru, lru, C, 3) == [A]
    assert miss(ctx, arc, C, 3) == [B]
    # insert C (new): |T1| + |B1| = 0 + 1 < c and the four lists hold 3 < 2c: no ghost dropped
    assert lists(arc) == ([C], [A], [B], [])
    # t4, B: a ghost hit in B1: p = min(2, 0 + max(1, |B2| / |B1| = 0 / 1)) = 1; REPLACE(B, 1):
    # |T1| = 1 is not > 1 -> T2's LRU, A. (LRU holds B: a hit there.)
    assert miss(ctx, arc, B, 4) == [A]
    assert arc.scopes[0].p == 1.0
    assert lists(arc) == ([C], [B], [], [A])
    # t5, A: a ghost hit in B2: p = max(0, 1 - max(1, |B1| / |B2| = 0 / 1)) = 0; REPLACE(A, 0):
    # |T1| = 1 > 0 -> T1's LRU, C
    assert miss(ctx, arc, A, 5) == [C]
    assert arc.scopes[0].p == 0.0
    assert lists(arc) == ([], [B, A], [C], [])


def test_arc_fractional_step_and_b2_trim():
    """c = 3, one layer of 8 experts; A..G = 0..6. The step of a B1 ghost hit is |B2| / |B1| when
    B2 is longer, and a new key drops B2's LRU ghost once the four lists hold 2c."""
    tr = trace([[[0]]], 1, 8)
    ctx = ctx_for(tr, 3)
    arc = make("arc", ctx)
    A, B, C, D, E, F, G = range(7)
    t = 0
    for k in (A, B, C):  # each used twice: T2 = [A, B, C]
        miss(ctx, arc, k, t)
        arc.on_access(k, t + 1)
        t += 2
    assert miss(ctx, arc, D, t) == [A]  # |T1| = 0: from T2 -> B2 = [A]; T1 = [D]
    assert miss(ctx, arc, E, t + 1) == [D]  # |T1| = 1 > p = 0 -> B1 = [D]; T1 = [E]
    arc.on_access(E, t + 2)  # T2 = [B, C, E]
    assert miss(ctx, arc, F, t + 3) == [B]  # |T1| = 0 -> T2's LRU; B2 = [A, B]; T1 = [F]
    assert lists(arc) == ([F], [C, E], [D], [A, B])
    # D, a ghost hit in B1: p = min(3, 0 + max(1, |B2| / |B1| = 2 / 1)) = 2; REPLACE(D, 2): |T1| = 1
    # is not > 2 -> T2's LRU, C
    assert miss(ctx, arc, D, t + 4) == [C]
    assert arc.scopes[0].p == 2.0
    assert lists(arc) == ([F], [E, D], [], [A, B, C])
    # G, new: REPLACE(G, 2) -> T2's LRU, E (B2 = [A, B, C, E]); the lists hold 1 + 1 + 0 + 4 = 6 = 2c
    # and |T1| + |B1| = 1 < c: B2's LRU ghost, A, is forgotten
    assert miss(ctx, arc, G, t + 5) == [E]
    assert lists(arc) == ([F, G], [D], [], [B, C, E])
    assert arc.where[A] == arc_mod.NONE
    # B, a ghost hit in B2: p = max(0, 2 - max(1, |B1| / |B2| = 0 / 3)) = 1; REPLACE(B, 1): |T1| = 2 > 1
    # -> T1's LRU, F
    assert miss(ctx, arc, B, t + 6) == [F]
    assert arc.scopes[0].p == 1.0
    assert lists(arc) == ([G], [D, B], [F], [C, E])


def test_arc_full_t1_drops_its_lru_without_a_ghost():
    """c = 2: A, B fill T1; C evicts A (T1's LRU), which ARC drops (|T1| = c, B1 empty): A's next
    miss is a new key, not a ghost hit, and p stays 0."""
    tr = trace([[[0]]], 1, 4)
    ctx = ctx_for(tr, 2)
    arc = make("arc", ctx)
    miss(ctx, arc, 0, 0)
    miss(ctx, arc, 1, 1)
    assert miss(ctx, arc, 2, 2) == [0]
    assert lists(arc) == ([1, 2], [], [], [])  # A went to B1 and was dropped at C's insert
    assert miss(ctx, arc, 0, 3) == [1]
    assert arc.scopes[0].p == 0.0 and lists(arc) == ([2, 0], [], [], [])


def test_arc_skips_pinned_and_first_use_is_not_a_hit():
    tr = trace([[[0]]], 2, 4)
    ctx = ctx_for(tr, 4)  # uniform: 2 slots per layer
    arc = make("arc", ctx)
    eb = ctx.preset.expert_bytes
    miss(ctx, arc, 0, 0)
    arc.on_access(0, 1)  # T2 = [0]
    miss(ctx, arc, 1, 2)  # T1 = [1]: its first use is its load's, not a hit
    assert lists(arc) == ([1], [0], [], [])
    # layer 1 is a separate ARC: a prefetch insert of key 4 leaves layer 0 alone
    ctx.cache.insert_resident(4, eb)
    arc.on_insert(4, 2)
    assert lists(arc, 1) == ([4], [], [], []) and lists(arc) == ([1], [0], [], [])
    ctx.cache.pinned.add(1)  # REPLACE names T1 (|T1| = 1 > p = 0) but 1 is in use: T2's LRU instead
    assert arc.victims(2, eb, 3, 0) == [0]
    ctx.cache.pinned.add(0)
    assert arc.victims(2, eb, 3, 0) is None
    ctx.cache.pinned.clear()
    ctx.cache.begin_load(5, eb)  # a loading expert is not evictable either
    arc.on_insert(5, 3)
    assert arc.victims(6, eb, 3, 1) == [4]


def test_arc_global_scope_spans_layers():
    tr = trace([[[0], [0]]], 2, 4)
    ctx = ctx_for(tr, 2)
    arc = make("arc", ctx, scope="global")
    assert arc.scopes[0].c == 2
    miss(ctx, arc, 0, 0)  # layer 0, expert 0
    miss(ctx, arc, 5, 0)  # layer 1, expert 1
    arc.on_access(0, 1)  # T2 = [0], T1 = [5]
    assert miss(ctx, arc, 6, 1) == [5]  # |T1| = 1 > 0: layer 1's expert, although 0 is in another layer


class TextbookARC:
    """ARC as the paper's Fig. 4 writes it, on a plain request sequence (an independent check)."""

    def __init__(self, c):
        self.c, self.p = c, 0.0
        self.t1, self.t2, self.b1, self.b2 = (OrderedDict() for _ in range(4))

    def _replace(self, x):
        if self.t1 and ((x in self.b2 and len(self.t1) == self.p) or len(self.t1) > self.p):
            self.b1[self.t1.popitem(last=False)[0]] = None
        else:
            self.b2[self.t2.popitem(last=False)[0]] = None

    def request(self, x) -> bool:
        c, t1, t2, b1, b2 = self.c, self.t1, self.t2, self.b1, self.b2
        if x in t1 or x in t2:
            (t1 if x in t1 else t2).pop(x)
            t2[x] = None
            return True
        if x in b1 or x in b2:
            if x in b1:
                self.p = min(c, self.p + max(len(b2) / len(b1), 1))
            else:
                self.p = max(0, self.p - max(len(b1) / len(b2), 1))
            self._replace(x)
            (b1 if x in b1 else b2).pop(x)
            t2[x] = None
            return False
        l1 = len(t1) + len(b1)
        if l1 == c:
            if len(t1) < c:
                b1.popitem(last=False)
                self._replace(x)
            else:
                t1.popitem(last=False)
        elif l1 + len(t2) + len(b2) >= c:
            if l1 + len(t2) + len(b2) == 2 * c:
                b2.popitem(last=False)
            self._replace(x)
        t1[x] = None
        return False


@pytest.mark.parametrize("c", [1, 2, 3, 5])
def test_arc_matches_the_textbook_algorithm(c):
    """Without pinning, the policy driven through the engine's protocol makes ARC's decisions:
    the same hits, lists and p as the paper's algorithm on 400 skewed random requests."""
    rng = np.random.default_rng(c)
    E = 8
    seq = rng.choice(E, size=400, p=np.array([8, 6, 5, 4, 3, 2, 1, 1]) / 30).tolist()
    ctx = ctx_for(trace([[[0]]], 1, E), c)
    arc, ref = make("arc", ctx), TextbookARC(c)
    for t, x in enumerate(seq):
        hit = ref.request(x)
        assert hit == ctx.cache.is_present(x)
        if hit:
            arc.on_access(x, t)
        else:
            miss(ctx, arc, x, t)
        assert lists(arc) == (list(ref.t1), list(ref.t2), list(ref.b1), list(ref.b2)), t
        assert arc.scopes[0].p == pytest.approx(ref.p)


def test_arc_bad_knobs():
    ctx = ctx_for(trace([[[0]]], 2, 4), 4)
    with pytest.raises(UserError, match=r"cache\.scope"):
        make("arc", ctx, scope="layers")
    with pytest.raises(UserError, match=r"cache\.sizes"):
        make("arc", ctx, sizes=[1, 1, 1])
    with pytest.raises(UserError, match=r"cache\.sizes"):
        make("arc", ctx, scope="global", sizes=[2, 2])


# ------------------------------------------------------------------------------------ mrs


def test_mrs_evicts_lowest_score_not_lru():
    """One layer, 3 slots, alpha = 0.5, no logits (s_t = the renormalised top-k weights).
    t0 {0: .9, 1: .1}; t1 {2: .9, 1: .1}; t2 {3: .6, 2: .4}."""
    tr = trace([[[0, 1]], [[2, 1]], [[3, 2]]], 1, 4,
               weights=[[[0.9, 0.1]], [[0.9, 0.1]], [[0.6, 0.4]]])
    assert tr.logits is None
    ctx = ctx_for(tr, 3)
    mrs = make("mrs", ctx)
    assert mrs.observes_steps
    mrs.on_step([0], 0)  # the engine, once layer 0 of t0 has gated
    miss(ctx, mrs, 0, 0)
    miss(ctx, mrs, 1, 0)
    # after t0: 0.5 * 0 + 0.5 * [.9, .1, 0, 0] = [.45, .05, 0, 0]
    np.testing.assert_allclose(mrs.score[0], [0.45, 0.05, 0, 0], atol=1e-7)
    mrs.on_step([1], 0)
    mrs.on_access(1, 1)  # t1: 1 is a hit (used after 0: LRU would now evict 0)
    miss(ctx, mrs, 2, 1)
    # after t1: 0.5 * [.45, .05, 0, 0] + 0.5 * [0, .1, .9, 0] = [.225, .075, .45, 0]
    np.testing.assert_allclose(mrs.score[0], [0.225, 0.075, 0.45, 0], atol=1e-7)
    ctx.cache.pinned.add(2)  # t2 needs 2 (resident) and 3 (a miss)
    # step (t2, layer 0) is told at the gate, before its victims: 0.5 * [.225, .075, .45, 0] + 0.5 *
    # [0, 0, .4, .6] = [.1125, .0375, .425, .3]; residents 0 (.1125), 1 (.0375), 2 pinned -> 1
    mrs.on_step([2], 0)
    assert mrs.victims(3, ctx.preset.expert_bytes, 2, 0) == [1]
    np.testing.assert_allclose(mrs.score[0], [0.1125, 0.0375, 0.425, 0.3], atol=1e-7)
    mrs.on_step([2], 0)  # the same (row, layer) again: not folded twice
    mrs.on_access(2, 2)
    np.testing.assert_allclose(mrs.score[0], [0.1125, 0.0375, 0.425, 0.3], atol=1e-7)
    lru_ctx = ctx_for(tr, 3)
    lru = make("lru", lru_ctx, scope="layer")
    miss(lru_ctx, lru, 0, 0)
    miss(lru_ctx, lru, 1, 0)
    lru.on_access(1, 1)
    miss(lru_ctx, lru, 2, 1)
    lru_ctx.cache.pinned.add(2)
    assert lru.victims(3, lru_ctx.preset.expert_bytes, 2, 0) == [0]  # LRU: 0, last used at t0


def test_mrs_ties_least_recent_and_no_peeking_at_later_layers():
    """Two layers of 4 experts, 2 slots each. Experts inserted without a use (prefetches) score 0:
    the older goes first. A prefetch's victims asked at step (t, layer 0) see layer 0's routing
    only (told at its gate), never layer 1's (not gated yet)."""
    tr = trace([[[0, 1], [0, 1]], [[2, 3], [2, 3]]], 2, 4)
    ctx = ctx_for(tr, 4)
    mrs = make("mrs", ctx)
    eb = ctx.preset.expert_bytes
    for k in (4 + 3, 4 + 2):  # layer 1: experts 3 then 2, prefetched at t0
        ctx.cache.insert_resident(k, eb)
        mrs.on_insert(k, 0)
    mrs.on_step([0], 0)  # layer 0 of t0 gates
    assert mrs.victims(4 + 0, eb, 0, 0, demand=False) == [4 + 3]  # both 0; 3 is older
    np.testing.assert_allclose(mrs.score[0], [0.25, 0.25, 0, 0])  # layer 0 took t0: .5 * [.5, .5, 0, 0]
    np.testing.assert_allclose(mrs.score[1], 0.0)  # layer 1 did not
    mrs.on_step([1], 1)  # layer 1 at t1 (t0 of layer 1 was never told: not folded)
    mrs.on_access(4 + 2, 1)
    np.testing.assert_allclose(mrs.score[1], [0, 0, 0.25, 0.25])


def test_mrs_prefill_batch_folds_its_prompt_rows_once():
    """Rows 0, 1: a prompt (one prefill batch: told both rows); row 2: decode. One layer, alpha = 0.5."""
    tr = trace([[[0, 1]], [[0, 2]], [[3, 2]]], 1, 4, weights=[[[0.5, 0.5]], [[0.75, 0.25]], [[0.5, 0.5]]])
    tr.is_decode = np.array([False, False, True])
    ctx = ctx_for(tr, 4)
    mrs = make("mrs", ctx)
    mrs.on_step([0, 1], 0)  # the prefill batch's step, at its gate
    for k in (0, 1, 2):
        miss(ctx, mrs, k, 0)  # the prefill batch: every access is booked at row 0
    # rows 0 then 1: 0.5 * (0.5 * [.5, .5, 0, 0]) + 0.5 * [.75, 0, .25, 0] = [.5, .125, .125, 0]
    np.testing.assert_allclose(mrs.score[0], [0.5, 0.125, 0.125, 0])
    mrs.on_step([0, 1], 0)  # told again (a recomputed prompt): each (row, layer) is folded once
    np.testing.assert_allclose(mrs.score[0], [0.5, 0.125, 0.125, 0])
    mrs.on_step([2], 0)  # row 2: 0.5 * [.5, .125, .125, 0] + 0.5 * [0, 0, .5, .5]
    mrs.on_access(2, 2)
    np.testing.assert_allclose(mrs.score[0], [0.25, 0.0625, 0.3125, 0.25])
    chunked = make("mrs", ctx_for(tr, 4))  # the prompt in two chunks (serving): the same scores
    chunked.on_step([0], 0)
    np.testing.assert_allclose(chunked.score[0], [0.25, 0.25, 0, 0])  # the first chunk alone: row 1 unread
    chunked.on_step([1], 0)
    np.testing.assert_allclose(chunked.score[0], [0.5, 0.125, 0.125, 0])


def test_mrs_logits_softmax_and_top_p():
    """With logits, s_t is their softmax: log([.5, .25, .125, .125]) gives those back exactly."""
    lg = np.log(np.array([[[0.5, 0.25, 0.125, 0.125]]], np.float32))
    tr = trace([[[0, 1]]], 1, 4)
    tr.logits = lg
    for top_p, want in ((0, [0.25, 0.125, 0.0625, 0.0625]),  # 0: 2 * top_k = 4, all kept
                        (1, [0.25, 0, 0, 0]),
                        (3, [0.25, 0.125, 0.0625, 0])):  # the tie at .125: the lower id stays
        ctx = ctx_for(tr, 4)
        mrs = make("mrs", ctx, top_p=top_p)
        mrs.on_step([0], 0)
        np.testing.assert_allclose(mrs.score[0], want, atol=1e-7)


@pytest.mark.parametrize(("logits", "top_p"), [(True, 0), (True, 3), (False, 0), (False, 1)])
def test_mrs_one_row_at_a_time_equals_a_prompt_batch(logits, top_p):
    """The decode hot path (one row) and the prefill path (a run of rows, closed form) agree."""
    tr = random_trace(np.random.default_rng(7), tokens=0, prefill=9, layers=2, experts=6, top_k=2)
    if not logits:
        tr.logits = None
    ctx = ctx_for(tr, 4)
    batch, single = make("mrs", ctx, top_p=top_p), make("mrs", ctx, top_p=top_p)
    batch.on_step(list(range(9)), 0)  # the prompt as one step: rows 0..8 of layer 0
    for r in range(9):
        single.on_step([r], 0)
    np.testing.assert_allclose(batch.score[0], single.score[0], rtol=1e-12, atol=1e-15)
    assert batch.score[0].sum() > 0 and not batch.score[1].any()


def test_mrs_global_scope_compares_layers():
    tr = trace([[[0, 1], [2, 3]]], 2, 4, weights=[[[0.9, 0.1], [0.6, 0.4]]])
    ctx = ctx_for(tr, 4)
    mrs = make("mrs", ctx, scope="global")
    mrs.on_step([0], 0)
    mrs.on_step([0], 1)
    for k in (0, 1, 4 + 2, 4 + 3):
        miss(ctx, mrs, k, 0)
    # scores: layer 0 [.45, .05, 0, 0], layer 1 [0, 0, .3, .2]: the lowest resident is key 1
    assert mrs.victims(4 + 0, ctx.preset.expert_bytes, 0, 1) == [1]


def test_mrs_global_room_for_two_and_loading_members():
    """scope=global: a load needing two slots' bytes takes the two lowest scores; a member still
    loading (or pinned) is never named, whatever its score."""
    tr = trace([[[0, 1], [2, 3]]], 2, 4, weights=[[[0.9, 0.1], [0.6, 0.4]]])
    ctx = ctx_for(tr, 4)
    mrs = make("mrs", ctx, scope="global")
    eb = ctx.preset.expert_bytes
    mrs.on_step([0], 0)
    mrs.on_step([0], 1)
    for k in (0, 1, 4 + 2, 4 + 3):  # scores: 0 .45, 1 .05, 6 .3, 7 .2
        miss(ctx, mrs, k, 0)
    assert mrs.victims(4 + 0, 2 * eb, 0, 1) == [1, 7]
    assert mrs.victims(4 + 0, 5 * eb, 0, 1) is None  # all four free only 4 slots
    ctx.cache.evict(1)
    mrs.on_evict(1)
    ctx.cache.begin_load(5, eb)  # key 5 (score 0) is loading: not evictable
    mrs.on_insert(5, 0)
    assert mrs.victims(4 + 0, eb, 0, 1) == [7]
    ctx.cache.pinned.add(7)
    assert mrs.victims(4 + 0, eb, 0, 1) == [6]
    ctx.cache.finish_load(5)
    assert mrs.victims(4 + 0, eb, 0, 1) == [5]


def test_mrs_global_victims_are_a_sort_of_every_evictable_member():
    """The numpy argmin of scope=global names what a sort of every evictable member by (score, last
    use, key) names, on a random protocol (pins, loads in flight, loads needing 1-2 slots, ties)."""
    tr = random_trace(np.random.default_rng(5), tokens=25, layers=3, experts=6, top_k=2, locality=0.5)
    tr.logits = None
    ctx = ctx_for(tr, 7)
    mrs = make("mrs", ctx, scope="global", top_p=1)  # top_p=1: many exact ties at 0
    rank = lambda k, t, layer: (mrs.score.ravel()[k], mrs.last[k], k)  # noqa: E731
    assert check_victims_against_ranking(mrs, ctx, tr, rank) > 50


def test_mrs_bad_knobs():
    ctx = ctx_for(trace([[[0, 1]]], 2, 4), 4)
    for knobs, name in (({"alpha": 1.0}, "cache.alpha"), ({"alpha": -0.5}, "cache.alpha"),
                        ({"top_p": 5}, "cache.top_p"), ({"top_p": -1}, "cache.top_p"),
                        ({"scope": "all"}, "cache.scope"), ({"sizes": [4, 4]}, "cache.sizes"),
                        ({"scope": "global", "sizes": [2, 2]}, "cache.sizes")):
        with pytest.raises(UserError, match=name.replace(".", r"\.")):
            make("mrs", ctx, **knobs)
    with pytest.raises(UserError, match=r"cache\.alpha"):
        sim.run(hw="rtx4090.yaml", trace="toy", **{"cache.name": "mrs", "cache.alpha": 2.0, "engine.max_tokens": 4})


# ------------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("name", ["arc", "mrs"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_end_to_end(name, scope):
    """Through `sim.run`: the toy trace (logits, prefills) and a synthetic one; a real cache
    policy hits more than nothing and is deterministic. (At 48 slots, fewer than one token's 64
    experts, a global ARC hits nothing on the toy trace, as global LRU and textbook ARC do.)"""
    keys = {"cache.name": name, "cache.scope": scope, "cache.slots": 96, "engine.max_tokens": 32}
    a = sim.run(hw="rtx4090.yaml", trace="toy", policy="baseline", **keys)
    b = sim.run(hw="rtx4090.yaml", trace="toy", policy="baseline", **keys)
    assert a.summary["tokens_decode"] == 32 and 0 < a.summary["hit_rate"] < 1
    assert a.summary["tpot_mean_s"] == b.summary["tpot_mean_s"]
    tr = random_trace(np.random.default_rng(3), tokens=24, layers=4, experts=8, top_k=2, prefill=5,
                      sequences=2, locality=0.6)
    tr.logits = None  # ids and weights only, as the Mixtral HumanEval trace
    res = sim.run(hw="rtx4090.yaml", trace=tr, policy="baseline",
                  **{"cache.name": name, "cache.scope": scope, "cache.slots": 12}, **MODEL)
    assert res.summary["tokens_decode"] == 48 and 0 < res.summary["hit_rate"] <= 1


def test_end_to_end_with_prefetch():
    """With a prefetch policy (pre-gated loads: inserts before use) both still run."""
    for name in ("arc", "mrs"):
        res = sim.run(hw="rtx4090.yaml", trace="toy", policy="adapmoe_yield",
                      **{"cache.name": name, "cache.slots": 64, "engine.max_tokens": 24})
        assert res.summary["tokens_decode"] == 24 and res.summary["prefetch_issued"] > 0
