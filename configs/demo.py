"""The embedded default: pixels -> curated training set -> small MAE -> every block -> b* -> maps -> report.

    python -m vitally_jax.main --config=configs/demo.py                      # 2 CPU cores, <= 15 min
    python -m vitally_jax.main --config=configs/demo.py --workdir=runs/mine  # another output folder
    python -m vitally_jax.main --config=configs/demo.py:ci                   # shrunken end-to-end run (CI)

No downloads: the synthetic Cell Painting screen is generated into WORKDIR/screen. Outputs: WORKDIR/report.html
(self-contained), WORKDIR/results.json, WORKDIR/results.csv. Rerunning reuses finished stages
(WORKDIR/stages/*.json); `--config.force=pretrain,embed` reruns named stages and everything after them.

The report's "Findings" table checks the paper's claims on the run's own numbers: the trained MAE should beat a
random-init ViT of the same size on known-relationship recall (CORUM, StringDB) and on probe accuracy, and
TVN-aligned maps should beat unaligned ones on recall. Which way the encoder comparison goes depends on the
pooling, so the probe stage picks it (`probe.pooling` lists the candidates; the trained model's probe decides).
Measured with this config (encoder width 128, depth 4, patch 8 on 64x64 crops, LayerScale init 0.1,
320 steps of 96 crops; 9.5 min wall on 2 cores): the MAE's probe prefers CLS + final norm (0.21 vs 0.15 for
mean pooling), and there the random-init ViT wins (TVN maps: CORUM recall 0.30 vs 0.24, StringDB 0.27 vs 0.23;
gene-group probe 0.64 vs 0.39). With mean pooling forced (`--config.probe.pooling=mean`, 400 steps) the MAE
wins (CORUM 0.15 vs 0.11, StringDB 0.15 vs 0.08, gene groups 0.35 vs 0.10) only because mean-pooled random
features are weak. TVN beats unaligned either way. The MAE loss only falls from 1.28 to ~1.0, and both
encoders stay far below the image-statistics baseline (CORUM 0.46): self-standardised crops hide this world's
intensity phenotypes and its shape effects are too subtle for a small MAE in 15 CPU minutes.
"""
import importlib.util
import pathlib

import ml_collections

_spec = importlib.util.spec_from_file_location("vitally_configs_common", pathlib.Path(__file__).with_name("common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def get_config(arg=None):
    """`arg`: None (full demo) or "ci"/"smoke" (everything shrunk for a <= 3 min end-to-end run)."""
    arg = (arg or "").strip()
    if arg not in ("", "ci", "smoke"):
        from vitally_jax.errors import ConfigError

        raise ConfigError(f"configs/demo.py: unknown argument {arg!r}; expected nothing, 'ci' or 'smoke'")
    small = arg in ("ci", "smoke")

    c = ml_collections.ConfigDict()
    c.job = "demo"
    c.workdir = "./runs/demo-ci" if small else "./runs/demo"  # used when --workdir is not given
    c.seed = 0
    c.force = ""  # comma-separated stage names to rerun even if finished (and everything after them)

    # The synthetic screen (vitally_jax.data.synthetic): a preset plus overrides of SyntheticConfig fields.
    c.screen = ml_collections.ConfigDict()
    c.screen.store = None  # an existing store folder to use instead of generating one
    c.screen.preset = "tiny" if small else "demo"
    c.screen.overrides = ml_collections.ConfigDict()  # field -> value, applied to the preset

    # Curation (vitally_jax.curation.CurationConfig fields) on image-statistics embeddings.
    c.curate = ml_collections.ConfigDict()
    c.curate.enabled = True
    c.curate.min_experiments = 2
    c.curate.min_wells = 2
    c.curate.keep_positive_controls = 0.1
    c.curate.keep_negative_controls = 0.3
    c.curate.n_permutations = 200 if small else 1000
    c.curate.alpha = 0.05
    c.curate.quality = True

    # Pretraining: a complete trainer config (configs/common.py), trained on WORKDIR/screen + the curated index.
    t = common.build(dict(variant="mu/8", total_steps=320, global_batch=96, peak_lr=5e-4, drop_path_rate=0.0,
                          mesh=(-1, 1, 1), peak_flops=None), None)
    t.model.in_chans = 6
    # encoder: the mu/8 patching with a wider, deeper trunk; LayerScale starts at 0.1 (as CaiT does for shallow
    # ViTs) so that the blocks contribute within a few hundred steps (1e-4 keeps them near identity that long)
    t.model.width = 128
    t.model.depth = 4
    t.model.num_heads = 4
    t.model.mlp_dim = 512
    t.model.init_values = 0.1
    t.model.decoder_depth = 1  # the decoder sees all 64 tokens: keep it light, spend the compute on the encoder
    t.model.decoder_width = 64
    t.model.decoder_heads = 2
    t.input.crop = 64
    t.input.in_memory = True  # the demo screen (~250 MB) fits in memory: crops become numpy slices
    t.checkpoint.every_steps = 100
    t.checkpoint.keep = 1
    t.checkpoint.export_encoder = True
    t.log.every_steps = 20
    t.log.recon_every_steps = 200
    t.log.recon_images = 2
    t.log.tensorboard = False
    if small:
        t.model.width, t.model.depth, t.model.num_heads, t.model.mlp_dim = 64, 3, 2, 256
        t.model.decoder_depth = 1
        t.model.decoder_width = 32
        t.input.crop = 32
        t.input.global_batch = 32
        t.total_steps = 30
        t.checkpoint.every_steps = 30
        t.log.every_steps = 10
        t.log.recon_every_steps = 30
    c.train = t

    # Embedding every block of each encoder (vitally_jax.embed_screen); crops tile each image.
    c.embed = ml_collections.ConfigDict()
    c.embed.crop = t.input.crop
    c.embed.poolings = "cls,cls_norm,mean,mean_norm"  # stored poolings (one pass computes them all)
    c.embed.batch_size = 64 if small else 256
    c.embed.random_seed = 1  # seed of the random-init baseline encoder

    # Probe sweep (vitally_jax.probe_sweep).
    c.probe = ml_collections.ConfigDict()
    # the pooling probed and mapped: "cls" | "cls_norm" | "mean" | "mean_norm", or a list: each is probed and the
    # one with the trained model's best probe accuracy at b* is used for every encoder's maps
    c.probe.pooling = "mean" if small else "mean,cls_norm"
    c.probe.backend = "sklearn" if small else "jax"  # "jax" (all blocks in one vmapped solve) | "sklearn"
    c.probe.test_fraction = 0.25
    c.probe.folds = 3 if small else 5
    c.probe.group_min_size = 3 if small else 5  # functional gene groups: disjoint CORUM complexes of this many
    c.probe.group_max_size = 20                 # ... to this many screened genes
    c.probe.b_star_task = "mean"  # which task's b* picks the block for maps: "mean" | "perturbation" | "gene_groups"

    # Maps and benchmarks (vitally_jax.benchmarks).
    c.bench = ml_collections.ConfigDict()
    c.bench.alignments = "unaligned,pca_centerscale,tvn"
    c.bench.batch_col = "experiment"  # the unit of batch effect that alignment corrects, per batch
    c.bench.pca_components = 0  # 0 = all components
    c.bench.sources = "CORUM,HuMAP,Reactome,SIGNOR,StringDB"
    c.bench.compound_seeds = 5 if small else 100
    c.bench.map_permutations = 100 if small else 1000
    return c
