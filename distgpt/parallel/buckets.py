"""Gradient buckets: which layers' gradients are summed over ranks together.

The flat buffer puts each layer's four matrices side by side (model/layout.py), and their
gradients are final once the backward has finished that layer. Buckets group consecutive
layers, from the last one down (the backward's order), until each holds at least a given number
of elements; the last bucket is everything else (embeddings, biases, layernorms, padding), whose
gradients are final only when the backward ends. The data-parallel layer
(parallel/data_parallel.py) shards and moves them.
"""


class Bucket:
    def __init__(self, index, ranges, layers):
        """ranges: [(start, end)] of the flat buffer; layers: those whose matrices it holds
        (none for the last bucket)."""
        self.index, self.ranges, self.layers = index, ranges, sorted(layers)
        # the lowest layer: the bucket's gradients are final after its backward
        self.first_layer = self.layers[0] if self.layers else None
        self.splits = []  # per range (start, end, part): rank r owns [start + r part, start + (r+1) part)

    @property
    def numel(self):
        return sum(end - start for start, end in self.ranges)


def make_buckets(layout, bucket_elements):
    """Buckets in the backward's order: layers L-1 ... 0 grouped until each holds at least
    `bucket_elements`, then the rest of the flat buffer (up to layout.total) as the last."""
    buckets, group = [], []
    for layer in reversed(range(layout.n_layer)):
        group.append(layer)
        ranges = [layout.layer_matrices(x) for x in group]
        size = sum(end - start for start, end in ranges)
        if size >= bucket_elements or layer == 0:
            start, end = min(s for s, _ in ranges), max(e for _, e in ranges)
            if end - start != size:
                raise ValueError("a bucket's layers are not contiguous in the flat buffer")
            buckets.append(Bucket(len(buckets), [(start, end)], group))
            group = []
    covered = sorted(r for b in buckets for r in b.ranges)
    rest, at = [], 0
    for start, end in covered + [(layout.total, layout.total)]:
        if start > at:
            rest.append((at, start))
        at = max(at, end)
    buckets.append(Bucket(len(buckets), rest, []))
    return buckets
