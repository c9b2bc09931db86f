"""The embedded default: pixels -> curated training set -> small MAE -> every block -> b* -> maps -> report.

    python -m vitally_jax.main --config=configs/demo.py                      # 2 CPU cores, <= 15 min
    python -m vitally_jax.main --config=configs/demo.py --workdir=runs/mine  # another output folder
    python -m vitally_jax.main --config=configs/demo.py:ci                   # shrunken end-to-end run (CI)
    python -m vitally_jax.main --config=configs/demo.py:ablation             # curated vs uncurated, 2 seeds each

No downloads: the synthetic Cell Painting screen is generated into WORKDIR/screen. Outputs: WORKDIR/report.html
(self-contained), WORKDIR/results.json, WORKDIR/results.csv. Rerunning reuses finished stages
(WORKDIR/stages/*.json); `--config.force=pretrain,embed` reruns named stages and everything after them.

The report measures every representation against the same ceilings (the oracle of true process activations, the
visible oracle, chance) and baselines (image statistics, statistics of the self-standardised crops, CellProfiler
measurements, a random-init ViT at its own best readout), and tests the paper's claims with intervals: a claim
holds only where its interval excludes zero. This file quotes no results: read them in the report of your run.

`:ablation` pretrains on the curated and on the uncurated training set at equal steps, two seeds each, and
reports the difference with intervals (WORKDIR/ablation/report.html); `:ablation,ci` is its shrunken form.
"""

import ml_collections

from vitally_jax import config_lib
from vitally_jax.errors import ConfigError


def get_config(arg=None):
    """`arg`: None (full demo), "ci"/"smoke" (everything shrunk for a <= 3 min end-to-end run), "ablation" or
    "ablation,ci" (curated vs uncurated training set, 2 seeds each)."""
    parts = [a.strip() for a in (arg or "").split(",") if a.strip()]
    bad = [a for a in parts if a not in ("ci", "smoke", "ablation")]
    if bad:
        raise ConfigError(
            f"configs/demo.py: unknown argument {','.join(bad)!r}; expected nothing, 'ci', 'smoke', 'ablation' "
            "or 'ablation,ci'"
        )
    small = "ci" in parts or "smoke" in parts
    ablation = "ablation" in parts

    c = ml_collections.ConfigDict()
    c.job = "demo"
    c.workdir = "./runs/demo" + ("-ablation" if ablation else "") + ("-ci" if small else "")  # without --workdir
    c.seed = 0
    c.force = ""  # comma-separated stage names to rerun even if finished (and everything after them)

    # The synthetic screen (vitally_jax.data.synthetic): a preset plus overrides of SyntheticConfig fields.
    c.screen = ml_collections.ConfigDict()
    c.screen.store = None  # an existing store folder to use instead of generating one
    c.screen.preset = "tiny" if small else "demo"
    c.screen.overrides = ml_collections.ConfigDict()  # field -> value, applied to the preset

    # The world's declared keys (docs/world.md), applied after the preset and screen.overrides; set them from the
    # command line, e.g. --config.world.seed=7 --config.world.image_size=96 (checked before anything is written).
    c.world = ml_collections.ConfigDict()
    c.world.seed = 0  # seed of the biology, the layout, the batch effects, the artefacts and the pixels
    c.world.image_size = 64 if small else 128  # field size in pixels (square); at least the crop
    c.world.n_genes = 48 if small else 360
    c.world.n_experiments = 4 if small else 6

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
    # image-quality thresholds (CurationConfig): blank below this max channel std (uint8 units), saturated above
    # this fraction of a channel's pixels at 255, out of focus below this ratio of the plate's median sharpness,
    # debris above this fraction of pixels bright in every channel at once
    c.curate.blank_max_contrast = 4.0
    c.curate.saturated_max_fraction = 0.1
    c.curate.focus_min_ratio = 0.3
    c.curate.debris_min_cobright = 0.001

    # Baselines computed in the same run (vitally_jax.demo.baselines).
    c.baselines = ml_collections.ConfigDict()
    c.baselines.cellprofiler = True  # nuclei + cells segmented with scikit-image, measured with cp_measure
    c.baselines.cp_features = "sizeshape,intensity"  # cp_measure feature sets (texture is costlier)
    c.baselines.cp_max_cells = 6 if small else 12  # cells measured per image (seeded subset; median per image)
    c.baselines.cp_workers = 2  # processes measuring images in parallel (the demo's 2 cores)
    c.baselines.dna_channel = "DNA"  # nuclei are segmented on this channel
    c.baselines.cyto_channel = "Actin"  # cells are grown from the nuclei on this channel

    # Ablation (configs/demo.py:ablation): curated vs uncurated training set at equal steps, these seeds each.
    c.ablation = ml_collections.ConfigDict()
    c.ablation.enabled = ablation
    c.ablation.seeds = "0,1"

    # Pretraining: a complete trainer config (config_lib.build), trained on WORKDIR/screen + the curated index.
    t = config_lib.build(
        dict(
            variant="mu/8",
            total_steps=1200,
            global_batch=64,
            peak_lr=1.5e-3,
            drop_path_rate=0.0,
            mesh=(-1, 1, 1),
            peak_flops=None,
        ),
        None,
    )
    t.model.in_chans = 6
    # encoder: width 48, 6 blocks (deep enough to ask whether an intermediate block beats the last), patch 8, with
    # LayerScale starting at 0.1 (as CaiT does for shallow ViTs) so that the blocks contribute early (1e-4 keeps
    # them near identity for hundreds of steps)
    t.model.width = 48
    t.model.depth = 6
    t.model.num_heads = 2
    t.model.mlp_dim = 192
    t.model.init_values = 0.1
    # per-patch normalised targets (the MAE paper's norm_pix_loss): the loss cannot be lowered by predicting a
    # patch's mean brightness alone, so more of it rests on texture and shape inside the patch
    t.model.norm_pix_loss = True
    t.model.decoder_depth = 1  # the decoder sees all 64 tokens: keep it light, spend the compute on the encoder
    t.model.decoder_width = 64
    t.model.decoder_heads = 2
    # AdamW, not the paper's Lion: at this size and step count Lion's fixed-size sign steps stay on the
    # predict-the-mean plateau, while AdamW leaves it within a few hundred steps.
    t.optax.name = "adamw"
    t.input.crop = 64
    t.input.in_memory = True  # the demo screen (~250 MB) fits in memory: crops become numpy slices
    t.checkpoint.every_steps = 500
    t.checkpoint.keep = 1
    t.checkpoint.export_encoder = True
    t.log.every_steps = 100
    t.log.recon_every_steps = 500
    t.log.recon_images = 2
    t.log.tensorboard = False
    if small:
        t.model.width = 32
        t.model.mlp_dim = 64
        t.model.decoder_width = 32
        t.input.crop = 32
        t.input.global_batch = 32
        t.total_steps = 30
        t.checkpoint.every_steps = 30
        t.log.every_steps = 10
        t.log.recon_every_steps = 30
    c.train = t

    # Embedding every block of each encoder (vitally_jax.embedding.screen); crops tile each image.
    c.embed = ml_collections.ConfigDict()
    c.embed.crop = t.input.crop
    c.embed.poolings = "cls,cls_norm,mean,mean_norm"  # stored poolings (one pass computes them all)
    c.embed.batch_size = 64 if small else 256
    c.embed.random_seed = 1  # seed of the random-init baseline encoder

    # Probes (vitally_jax.demo.probe): every pooling and block of both encoders; each encoder's readout is chosen
    # on one half of the experiments and every reported score comes from the other half.
    c.probe = ml_collections.ConfigDict()
    # candidate poolings (each must be in embed.poolings)
    c.probe.pooling = "cls,mean" if small else "cls,cls_norm,mean,mean_norm"
    c.probe.backend = "jax"  # "jax" (all blocks in one vmapped solve) | "sklearn"
    c.probe.test_fraction = 0.25  # perturbation probe: share of the experiments held out
    c.probe.folds = 3  # gene-group probe: stratified folds over genes
    c.probe.select_seeds = 2 if small else 3  # CV seeds on the selection half
    c.probe.cv_seeds = 3 if small else 10  # CV seeds (repeats) on the evaluation half (mean +- SD)
    c.probe.group_min_size = 3  # functional gene groups: disjoint CORUM complexes of this many
    c.probe.group_max_size = 20  # ... to this many screened genes
    c.probe.max_groups = 40

    # Maps and benchmarks (vitally_jax.benchmarks).
    c.bench = ml_collections.ConfigDict()
    c.bench.alignments = "unaligned,pca_centerscale,tvn"
    c.bench.batch_col = "experiment"  # the unit of batch effect that alignment corrects, per batch
    c.bench.pca_components = 0  # 0 = all components
    c.bench.sources = "CORUM,HuMAP,Reactome,SIGNOR,StringDB"
    c.bench.compound_seeds = 5 if small else 50
    c.bench.map_permutations = 100 if small else 500
    c.bench.bootstrap_sources = "CORUM,StringDB"  # per-pair hits kept for paired bootstrap intervals
    c.bench.bootstrap = 200 if small else 2000  # bootstrap resamples
    c.bench.primary_alignment = "tvn"  # the alignment of the encoder comparisons in the findings
    return c
