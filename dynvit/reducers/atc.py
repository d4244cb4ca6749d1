"""ATC: agglomerative token clustering (Haurum et al., "Agglomerative Token Clustering", ECCV 2024), as its
official code (``JoakimHaurum/ATC``) computes it.

Between attention and MLP, the patch tokens are clustered bottom-up (scikit-learn's
``AgglomerativeClustering`` on the precomputed distances ``1 − cos`` between the attention keys averaged
over heads, one image at a time, ``linkage`` average, complete or single) and every cluster becomes one
token: the size-weighted mean of its members, with sizes added up. Prefix tokens stay in front, unclustered;
the clusters follow in scikit-learn's label order. Proportional attention (``log size`` on the logits) is
optional. Two set-ups, both as the authors run them:

- **DeiT** (fine-tuned, ``ATC_setup/models/atc.py``): clustering in the blocks of ``reduction_loc`` (3, 6, 9)
  into ``int(N · reduction_ratio^(s+1))`` clusters at stage s (137, 96, 67 on DeiT-S at 0.7). Without
  ``prop_attn`` that model also forgets the sizes after each block, so a cluster is the plain mean of the
  tokens it joins; an average-pooling head takes the plain mean of the final tokens.
- **Off the shelf** (``SSLBackbone_setup/token_reduc``, ToMe's protocol): clustering in every block, ``r``
  counting the class token, so ``r`` removes ``r − 1`` tokens (T tokens → T − r clusters + class token);
  sizes always weigh the merge and an average-pooling head.

The clustering runs on the CPU in scikit-learn, image by image: ATC is slow (it dominates the forward pass
on DeiT-S), nothing of it is a tensor op, so it neither traces nor exports, and fvcore does not count it.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import numpy as np
import torch
from timm.models.vision_transformer import Attention, VisionTransformer

from dynvit.methods import Knob, Method, register
from dynvit.models.dynamic_vit import keep_counts
from dynvit.models.tokens import validate_loc
from dynvit.reducers.base import ReducedRun, ReducedViT

LINKAGES = ("average", "complete", "single")


def agglomerative_clustering() -> type:
    """scikit-learn's ``AgglomerativeClustering``, or an ``ImportError`` naming the fix."""
    try:
        return importlib.import_module("sklearn.cluster").AgglomerativeClustering
    except ImportError:
        raise ImportError(
            "ATC clusters tokens with scikit-learn's AgglomerativeClustering, which is not installed: "
            "pip install scikit-learn"
        ) from None


def cluster_labels(keys: torch.Tensor, num_clusters: int, linkage: str) -> torch.Tensor:
    """Cluster of every token (B, n) int64 in 0..num_clusters−1, for key vectors (B, n, D).

    As ATC: distances ``1 − cos`` in the keys' dtype, handed to scikit-learn as a precomputed matrix, one
    image at a time; the labels are scikit-learn's.
    """
    clustering = agglomerative_clustering()(n_clusters=num_clusters, metric="precomputed", linkage=linkage)
    with torch.no_grad():
        unit = keys / keys.norm(dim=-1, keepdim=True)
        distances = (1 - unit @ unit.transpose(-1, -2)).cpu().numpy()
    labels = np.stack([clustering.fit(d).labels_ for d in distances]).astype(np.int64)
    return torch.from_numpy(labels).to(keys.device)


def merge_clusters(x: torch.Tensor, labels: torch.Tensor, num_tokens: int, mode: str = "sum") -> torch.Tensor:
    """Rows of x (B, T, C) combined by ``mode`` into ``num_tokens`` rows by ``labels`` (B, T): row j gathers
    every row labelled j (onto zeros, as ATC)."""
    out = x.new_zeros(x.shape[0], num_tokens, x.shape[-1])
    return out.scatter_reduce(1, labels.unsqueeze(-1).expand_as(x), x, reduce=mode)


def attention_with_keys(
    attn: Attention, h: torch.Tensor, size: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output (B, T, C) of normed tokens h and its keys averaged over heads (B, T, head_dim).

    Unfused, as ATC writes it (``(q kᵀ) · scale + log size``, softmax), so the clustering sees the very
    keys and tokens ATC's code does: agglomerative clustering turns rounding differences into other clusters.
    """
    B, T, _ = h.shape
    q, k, v = attn.qkv(h).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q @ k.transpose(-2, -1)) * attn.scale
    if size is not None:
        logits = logits + size.log()[:, None, None, :]
    out = attn.norm((attn.attn_drop(logits.softmax(dim=-1)) @ v).transpose(1, 2).reshape(B, T, -1))
    if attn.gate is not None:
        out = out * attn.gate(h).sigmoid()
    return attn.proj_drop(attn.proj(out)), k.mean(dim=1)


class ATCViT(ReducedViT):
    """A timm ViT that clusters its tokens agglomeratively between attention and MLP (ATC).

    Build with ``dynvit.methods.get("atc").build(vit)`` (DeiT set-up: blocks 3, 6, 9, ratio 0.7) or
    ``build(vit, r=16)`` (off the shelf: every block).
    """

    method = "atc"

    @classmethod
    def from_vit(cls, vit: VisionTransformer, **params) -> ATCViT:
        """As :meth:`ReducedViT.from_vit`; first checks that scikit-learn is there (``ImportError`` naming the fix)."""
        agglomerative_clustering()
        return super().from_vit(vit, **params)

    def configure(
        self,
        reduction_loc: Sequence[int] | None = None,
        reduction_ratio: float | None = None,
        r: int | Sequence[int] | None = None,
        linkage: str = "average",
        prop_attn: bool = True,
    ) -> None:
        """Args (ATC's names):
        reduction_loc, reduction_ratio: The DeiT set-up: blocks that cluster (by default DynamicViT's
            stage blocks, 3, 6, 9 on 12 blocks) and the keep ratio ρ: ``int(N · ρ^(s+1))`` clusters at
            stage s (0.7 by default).
        r: The off-the-shelf set-up instead: tokens to remove in every block (an int, or one per block),
            counting the class token (``r`` removes ``r − 1``); at most all the patch tokens.
        linkage: ``"average"``, ``"complete"`` or ``"single"``.
        prop_attn: Add ``log(size)`` to the attention logits. In the DeiT set-up, off also drops the sizes
            after each block (clusters become plain means), as ATC's model does.
        """
        if linkage not in LINKAGES:
            raise ValueError(f"linkage must be one of {LINKAGES}, got {linkage!r}")
        depth, n = len(self.blocks), self.num_patches
        if r is not None:
            if reduction_loc is not None or reduction_ratio is not None:
                raise ValueError(
                    "give either r (off-the-shelf set-up: every block) or reduction_loc/reduction_ratio "
                    "(DeiT set-up), not both"
                )
            rs = [r] * depth if isinstance(r, int) else list(r)
            if len(rs) != depth or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in rs):
                raise ValueError(f"r must be an int >= 0 or {depth} of them (one per block), got {r!r}")
            self.removals, self.reduction_loc, self.reduction_ratio = rs, None, None
        else:
            loc = self.default_loc() if reduction_loc is None else tuple(reduction_loc)
            loc = validate_loc(loc, depth, "reduction_loc")
            ratio = 0.7 if reduction_ratio is None else reduction_ratio
            if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= 1:
                raise ValueError(f"reduction_ratio must be a keep ratio in (0, 1], got {ratio!r}")
            clusters = keep_counts(n, ratio, len(loc))
            if clusters[-1] < 1:
                raise ValueError(
                    f"reduction_ratio {ratio} leaves {clusters[-1]} of {n} patch tokens at stage {len(loc)}: "
                    "raise it or cluster in fewer blocks"
                )
            self.removals, self.reduction_loc, self.reduction_ratio = None, loc, float(ratio)
            self.stage_clusters = dict(zip(loc, clusters, strict=True))
        self.linkage, self.prop_attn = linkage, bool(prop_attn)

    @property
    def off_the_shelf(self) -> bool:
        """Whether this is the off-the-shelf set-up (``r``) rather than the DeiT one."""
        return self.removals is not None

    def clusters(self) -> list[int | None]:
        """Clusters formed from the patch tokens in each block, None where it does not cluster."""
        p, patches, out = self.num_prefix_tokens, self.num_patches, []
        for i in range(len(self.blocks)):
            if self.off_the_shelf:
                r = min(self.removals[i], patches)
                # ATC: T − r clusters, T counting the prefix tokens; never more than the patches, at least one.
                k = max(min(patches + p - r, patches), 1) if r > 0 else None
            else:
                k = min(self.stage_clusters[i], patches) if i in self.stage_clusters else None
            if patches < 2:
                k = None  # one token is no clustering problem (scikit-learn, and so ATC's code, refuses it)
            out.append(k)
            patches = patches if k is None else k
        return out

    def token_schedule(self) -> list[tuple[int, int]]:
        p, n, counts = self.num_prefix_tokens, self.num_patches, []
        for k in self.clusters():
            counts.append((n + p, (n if k is None else k) + p))
            n = n if k is None else k
        return counts

    def run_blocks(self, x: torch.Tensor) -> ReducedRun:
        return self.trace(x)[0]

    def trace(
        self, x: torch.Tensor, track_sources: bool = False
    ) -> tuple[ReducedRun, torch.Tensor | None, list[torch.Tensor]]:
        """Embedded tokens (B, P + N, C) through the blocks.

        Returns:
            The run; with ``track_sources``, which original patches (B, M, N) bool each final non-prefix token
            stands for (else None); and per clustering block, the cluster (B, n_in) of each patch token.
        """
        B, T, _ = x.shape
        p = self.num_prefix_tokens
        size = None  # patches per token; unset until the first clustering: no attention bias (as ATC)
        # ATC's DeiT model without proportional attention forgets the sizes: every cluster a plain mean.
        plain_means = not (self.off_the_shelf or self.prop_attn)
        sources = None
        if track_sources:
            eye = torch.eye(T - p, dtype=torch.uint8, device=x.device)
            sources = torch.cat([eye.new_zeros(p, T - p), eye]).expand(B, -1, -1)
        assignments = []
        for block, k in zip(self.blocks, self.clusters(), strict=True):
            bias_size = size if self.prop_attn else None
            out, keys = attention_with_keys(block.attn, block.norm1(x), bias_size)
            x = x + block.drop_path1(block.ls1(out))
            if k is not None:
                labels = cluster_labels(keys[:, p:], k, self.linkage)
                assignments.append({"assignment": labels})
                # Prefix tokens keep their places in front; the clusters follow in label order.
                labels = torch.cat([torch.arange(p, device=x.device).expand(B, -1), labels + p], dim=1)
                size = x.new_ones(B, x.shape[1]) if size is None else size
                weight = torch.ones_like(size) if plain_means else size
                total = merge_clusters(weight.unsqueeze(-1), labels, k + p)
                x = merge_clusters(x * weight.unsqueeze(-1), labels, k + p) / total
                size = merge_clusters(size.unsqueeze(-1), labels, k + p).squeeze(-1)
                if sources is not None:
                    sources = merge_clusters(sources, labels, k + p, mode="amax")
            x = block.feed_forward(x)
        counts = torch.tensor(self.token_schedule(), device=x.device).expand(B, -1, -1)
        if sources is not None:
            sources = sources[:, p:].bool()
        return ReducedRun(tokens=x, kept=[], counts=counts, sizes=size), sources, assignments

    def pooled_head(self, x: torch.Tensor, sizes: torch.Tensor | None) -> torch.Tensor:
        # ATC's DeiT model pools the final tokens plainly; off the shelf they are weighed by size (ToMe's protocol).
        return super().pooled_head(x, sizes if self.off_the_shelf else None)

    @torch.no_grad()
    def predict_with_sources(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode logits and which original patches (B, M, N) bool each final non-prefix token stands for."""
        logits, sources, _ = self._predict(x, track_sources=True)
        return logits, sources

    @torch.no_grad()
    def predict_with_assignments(self, x: torch.Tensor) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """Eval-mode logits and, per clustering block, ``{"assignment": (B, n_in) int64}``: the output token each
        input non-prefix token went to (its cluster; the output's non-prefix tokens are the clusters in this
        order). A hard clustering without centre tokens, so no ``"centres"``
        (:func:`dynvit.reducers.clustering.patch_assignment` follows it all the same)."""
        logits, _, assignments = self._predict(x)
        return logits, assignments

    def _predict(self, x: torch.Tensor, track_sources: bool = False):
        with self.evaluating():
            run, sources, assignments = self.trace(self.embed(x), track_sources)
            return self.pooled_head(self.norm(run.tokens), run.sizes), sources, assignments


register(
    Method(
        name="atc",
        summary="cluster tokens agglomeratively (scikit-learn, 1 − cos of the keys, per image) into size-weighted "
        "means (ATC)",
        learned=False,
        build=ATCViT.from_vit,
        knob=Knob("reduction_ratio", 0.0, 1.0),
        cost="schedule",
        reports=frozenset({"counts", "sources", "assignments"}),
        onnx="its clustering runs in scikit-learn on NumPy arrays, image by image, outside the traced graph; "
        "ATC is also slow (the CPU clustering dominates a forward pass)",
        reference="JoakimHaurum/ATC ATC_setup/models/atc.py (DeiT), SSLBackbone_setup/token_reduc (off the shelf)",
        released={"DeiT set-up": {"reduction_loc": (3, 6, 9), "reduction_ratio": 0.7}},
    )
)

__all__ = ["ATCViT", "cluster_labels", "merge_clusters"]
