"""Representatives: the mean key of each event (default), or the mean of its
most-attended keys per head (EM-LLM's)."""

import torch

from vllm_episodic.core.representatives import mean_keys, representatives


def test_picks_the_keys_the_queries_attend_to():
    torch.manual_seed(42)
    heads, kv_heads, dim = 4, 2, 16
    lengths = torch.tensor([5, 9, 3])
    keys = torch.randn(17, kv_heads, dim)
    queries = torch.randn(6, heads, dim)
    # make token 7 (event 1, rank 2) the obvious target of every query of head 0 (kv head 0)
    keys[7, 0] = queries[:, 0].mean(0) * 20
    reps = representatives(queries[None], keys[None], keys[None], lengths, top=1)[0]
    assert reps.shape == (3, heads, dim)
    torch.testing.assert_close(reps[1, 0], keys[7, 0])


def test_brute_force_per_event_and_head():
    torch.manual_seed(7)
    heads, kv_heads, dim, top = 6, 3, 8, 2
    lengths = torch.tensor([4, 1, 6])
    rotated = torch.randn(11, kv_heads, dim)
    plain = torch.randn(11, kv_heads, dim)
    queries = torch.randn(5, heads, dim)
    reps = representatives(queries[None], rotated[None], plain[None], lengths, top=top)[0]
    start = 0
    for e, n in enumerate(lengths.tolist()):
        for h in range(heads):
            g = h // (heads // kv_heads)
            s = queries[:, h] @ rotated[start : start + n, g].T / dim**0.5  # [m, n]
            mass = s.softmax(-1).sum(0)
            best = mass.topk(min(top, n)).indices
            torch.testing.assert_close(reps[e, h], plain[start + best, g].mean(0))
        start += n


def test_without_observations_uses_every_key():
    keys = torch.randn(6, 1, 4)
    reps = representatives(torch.empty(1, 0, 2, 4), keys[None], keys[None], torch.tensor([2, 4]), top=8)[0]
    torch.testing.assert_close(reps[0, 1], keys[:2, 0].mean(0))
    torch.testing.assert_close(reps[1, 0], keys[2:, 0].mean(0))


def test_layers_at_once_equal_each_layer_alone():
    torch.manual_seed(3)
    layers, heads, kv_heads, dim = 3, 4, 2, 8
    lengths = torch.tensor([3, 7, 2, 5])
    rotated = torch.randn(layers, 17, kv_heads, dim)
    plain = torch.randn(layers, 17, kv_heads, dim)
    queries = torch.randn(layers, 6, heads, dim)
    together = representatives(queries, rotated, plain, lengths, top=2)
    for layer in range(layers):
        alone = representatives(queries[layer : layer + 1], rotated[layer : layer + 1],
                                plain[layer : layer + 1], lengths, top=2)
        torch.testing.assert_close(together[layer], alone[0])


def test_mean_keys_average_every_token_of_each_event_per_kv_head():
    torch.manual_seed(3)
    layers, kv_heads, dim = 2, 3, 8
    lengths = torch.tensor([4, 1, 7, 2])
    keys = torch.randn(layers, int(lengths.sum()), kv_heads, dim)
    reps = mean_keys(keys, lengths)
    assert reps.shape == (layers, 4, kv_heads, dim)
    start = 0
    for e, n in enumerate(lengths.tolist()):
        for h in range(kv_heads):
            torch.testing.assert_close(reps[:, e, h], keys[:, start : start + n, h].mean(1))
        start += n


def test_the_memory_stores_mean_keys_when_asked():
    """representatives_per_event=0: every stored event's representative is the mean of
    its un-rotated keys per KV head (held once per KV head), whatever the recent queries
    attend."""
    from test_memory import LAYERS, Sequence, run, settings

    seq = Sequence(400)
    _, memory = run(seq, settings(representatives_per_event=0), [300, 1, 1])
    store = memory.requests["r"].store
    assert store.num_events >= 10
    for layer in range(LAYERS):
        plain = seq.rope.rotate(seq.k[layer], torch.arange(400), inverse=True)
        for e in range(store.num_events):
            start, end = int(store.starts[e]), int(store.ends[e])
            torch.testing.assert_close(store.reps[layer, e], plain[start:end].mean(0), atol=1e-5, rtol=1e-5)
