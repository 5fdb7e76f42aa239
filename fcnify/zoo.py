"""The model-zoo sweep: every torchvision classifier and one timm model per family, converted.

    fcnify zoo --torchvision --timm -o docs/coverage.md
    python -m fcnify.zoo --filter 'resnet*'

Each model is built with random weights, converted in ``window``, ``dense`` and ``global``
mode from one trace (:func:`fcnify._convert.prepare` / :func:`~fcnify._convert.build`) and
verified at its own training size with a batch of one. A model is ``exact`` when every mode
verifies, ``refused`` when fcnify raises :class:`~fcnify.UnsupportedModelError` or
:class:`~fcnify.TraceError` (the reason goes into the table), and ``failed`` otherwise. Models are built one at a time and
freed before the next, so the sweep fits in 24 GB with regnet_y_128gf and vit_h_14.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import functools
import gc
import os
import re
import sys
import time
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ._errors import FcnifyError, TraceError, UnsupportedModelError

__all__ = [
    "ZooEntry",
    "ZooResult",
    "torchvision_entries",
    "timm_entries",
    "select",
    "check",
    "sweep",
    "coverage_markdown",
    "merge_rows",
    "main",
    "MODES",
    "TIMM_REPRESENTATIVES",
    "TIMM_NON_CNN",
]

MODES = ("window", "dense", "global")
KINDS = ("cnn", "transformer", "hybrid", "mlp")

#: torchvision modules whose models are transformers (the rest are CNNs).
TORCHVISION_NON_CNN = {"vision_transformer": "transformer", "swin_transformer": "transformer", "maxvit": "hybrid"}

#: timm families (the module defining the model) that are not CNNs: transformer, hybrid or MLP.
TIMM_NON_CNN = {
    "beit": "transformer",
    "byoanet": "hybrid",
    "cait": "transformer",
    "coat": "hybrid",
    "convit": "transformer",
    "crossvit": "transformer",
    "csatv2": "hybrid",
    "davit": "transformer",
    "deepseek_vit": "transformer",
    "deit": "transformer",
    "edgenext": "hybrid",
    "efficientformer": "hybrid",
    "efficientformer_v2": "hybrid",
    "efficientvim": "hybrid",
    "efficientvit_mit": "hybrid",
    "efficientvit_msra": "hybrid",
    "eva": "transformer",
    "fastvit": "hybrid",
    "focalnet": "transformer",
    "gcvit": "transformer",
    "gemma4_vit": "transformer",
    "hiera": "transformer",
    "hieradet_sam2": "transformer",
    "iformer": "hybrid",
    "levit": "hybrid",
    "lowformer": "hybrid",
    "maxxvit": "hybrid",
    "metaformer": "hybrid",
    "mlp_mixer": "mlp",
    "mobilenetv5": "hybrid",
    "mobilevit": "hybrid",
    "mvitv2": "transformer",
    "naflexvit": "transformer",
    "nest": "transformer",
    "nextvit": "hybrid",
    "pit": "transformer",
    "pvt_v2": "transformer",
    "qwen3_vit": "transformer",
    "sequencer": "mlp",
    "shvit": "hybrid",
    "swiftformer": "hybrid",
    "swin_transformer": "transformer",
    "swin_transformer_v2": "transformer",
    "swin_transformer_v2_cr": "transformer",
    "tiny_vit": "hybrid",
    "tnt": "transformer",
    "twins": "transformer",
    "vision_transformer": "transformer",
    "vision_transformer_hybrid": "hybrid",
    "vision_transformer_relpos": "transformer",
    "vision_transformer_sam": "transformer",
    "visformer": "hybrid",
    "vitamin": "hybrid",
    "volo": "transformer",
    "xcit": "transformer",
}

#: One small model per timm family, plus the variants whose heads differ. Families missing
#: here (added by a newer timm) fall back to their first model name.
TIMM_REPRESENTATIVES: Dict[str, Tuple[str, ...]] = {
    "beit": ("beit_base_patch16_224",),
    "byoanet": ("botnet26t_256",),
    "byobnet": ("gernet_s", "repvgg_a0", "mobileone_s0"),  # RepVGG and MobileOne: re-parameterizable blocks
    "cait": ("cait_xxs24_224",),
    "coat": ("coat_lite_mini",),
    "convit": ("convit_tiny",),
    "convmixer": ("convmixer_1024_20_ks9_p14",),
    "convnext": ("convnext_atto", "convnext_tiny_hnf"),  # norm after the pool; norm before it (head_norm_first)
    "cpubone": ("cpubone_nano",),
    "crossvit": ("crossvit_tiny_240",),
    "csatv2": ("csatv2",),
    "cspnet": ("cs3darknet_s", "cspresnet50"),
    "cspnext": ("cspnext_tiny",),
    "davit": ("davit_tiny",),
    "deepseek_vit": ("deepseek_vit_412m",),
    "deit": ("deit_tiny_patch16_224",),
    "densenet": ("densenet121",),
    "dla": ("dla34", "dla46_c"),
    "dpn": ("dpn48b",),
    "edgenext": ("edgenext_xx_small",),
    "efficientformer": ("efficientformer_l1",),
    "efficientformer_v2": ("efficientformerv2_s0",),
    "efficientnet": ("efficientnet_b0", "mixnet_s", "tf_efficientnet_b0"),  # tf_: 'same' padding
    "efficientvim": ("efficientvim_m1",),
    "efficientvit_mit": ("efficientvit_b0",),
    "efficientvit_msra": ("efficientvit_m0",),
    "eva": ("eva02_tiny_patch14_224",),
    "fasternet": ("fasternet_t0",),
    "fastvit": ("fastvit_t8",),
    "focalnet": ("focalnet_tiny_srf",),
    "gcvit": ("gcvit_xxtiny",),
    "gemma4_vit": ("gemma4_vit_167m",),
    "ghostnet": ("ghostnet_050", "ghostnetv2_100"),  # conv head with a hidden size
    "hardcorenas": ("hardcorenas_a",),
    "hgnet": ("hgnet_tiny", "hgnetv2_b0"),
    "hiera": ("hiera_tiny_224",),
    "hieradet_sam2": ("sam2_hiera_tiny",),
    "hrnet": ("hrnet_w18_small",),
    "iformer": ("iformer_t",),
    "inception_next": ("inception_next_atto",),
    "inception_resnet_v2": ("inception_resnet_v2",),
    "inception_v3": ("inception_v3",),
    "inception_v4": ("inception_v4",),
    "lcnetv2": ("lcnetv2_small",),
    "levit": ("levit_128s", "levit_conv_128s"),
    "lowformer": ("lowformer_b0",),
    "mambaout": ("mambaout_femto",),
    "maxxvit": ("coatnet_pico_rw_224", "maxvit_pico_rw_256"),
    "metaformer": ("poolformer_s12", "caformer_s18"),
    "mlp_mixer": ("mixer_s32_224",),
    # MobileNetV3's conv head with a hidden size, MobileNetV4, LCNet
    "mobilenetv3": ("mobilenetv3_small_050", "mobilenetv4_conv_small_035", "lcnet_035"),
    "mobilenetv5": ("mobilenetv5_300m",),
    "mobilevit": ("mobilevit_xxs",),
    "mvitv2": ("mvitv2_tiny",),
    "naflexvit": ("naflexvit_base_patch16_gap",),
    "nasnet": ("nasnetalarge",),
    "nest": ("nest_tiny",),
    "nextvit": ("nextvit_small",),
    "nfnet": ("nf_regnet_b0", "eca_nfnet_l0"),
    "pit": ("pit_ti_224",),
    "pnasnet": ("pnasnet5large",),
    "pvt_v2": ("pvt_v2_b0",),
    "qwen3_vit": ("qwen3_vit_88m",),
    "rdnet": ("rdnet_tiny",),
    "regnet": ("regnetx_002", "regnety_002", "regnetz_005"),
    "repghost": ("repghostnet_050",),
    "repvit": ("repvit_m0_9",),
    "res2net": ("res2net50_14w_8s",),
    "resnest": ("resnest14d",),
    "resnet": ("resnet18", "resnet10t"),
    "resnetv2": ("resnetv2_18", "resnetv2_50x1_bit"),  # BiT: the classifier is a 1x1 conv
    "rexnet": ("rexnet_100",),
    "selecsls": ("selecsls42b",),
    "senet": ("legacy_seresnet18",),
    "sequencer": ("sequencer2d_s",),
    "shvit": ("shvit_s1",),
    "sknet": ("skresnet18",),
    "starnet": ("starnet_s050",),
    "swiftformer": ("swiftformer_xs",),
    "swin_transformer": ("swin_tiny_patch4_window7_224",),
    "swin_transformer_v2": ("swinv2_tiny_window8_256",),
    "swin_transformer_v2_cr": ("swinv2_cr_tiny_ns_224",),
    "tiny_vit": ("tiny_vit_5m_224",),
    "tnt": ("tnt_s_patch16_224",),
    "tresnet": ("tresnet_m",),  # space-to-depth stem
    "twins": ("twins_pcpvt_small",),
    "vgg": ("vgg11",),  # ConvMlp pre-logits
    "visformer": ("visformer_tiny",),
    "vision_transformer": ("vit_tiny_patch16_224",),
    "vision_transformer_hybrid": ("vit_tiny_r_s16_p8_224",),
    "vision_transformer_relpos": ("vit_relpos_small_patch16_224",),
    "vision_transformer_sam": ("samvit_base_patch16_224",),
    "vitamin": ("vitamin_small_224",),
    "volo": ("volo_d1_224",),
    "vovnet": ("ese_vovnet19b_slim_dw",),
    "xception": ("legacy_xception",),
    "xception_aligned": ("xception41",),
    "xcit": ("xcit_nano_12_p16_224",),
}


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    """One model of the sweep.

    Attributes:
        library: ``torchvision`` or ``timm``.
        name: the library's model name.
        family: the module that defines the model (``resnet``, ``convnext``, ...).
        kind: ``cnn``, ``transformer``, ``hybrid`` (convolutions and attention) or ``mlp``.
        gflops: cost of one forward pass at the training size, when the library records it.
    """

    library: str
    name: str
    family: str
    kind: str = "cnn"
    gflops: Optional[float] = None

    @property
    def id(self) -> str:
        return f"{self.library}/{self.name}"


@dataclasses.dataclass
class ZooResult:
    """How one model fared.

    Attributes:
        entry: the model.
        status: ``exact`` (every mode verified), ``refused`` (``UnsupportedModelError``),
            ``partial`` (some modes exact, others refused) or ``failed``.
        reason: why a mode was refused or failed (first sentence of the error).
        modes: per mode, ``exact``, ``refused`` or ``failed``.
        max_abs_error: largest verification error over the modes that verified.
        max_rel_error: the same, relative to the largest logit (random weights can make logits huge).
        input_size: ``(C, H, W)`` training size.
        probe_size: the larger ``(H, W)`` the converted model was run at.
        output_map: window-mode output ``(K, h, w)`` at ``probe_size``.
        seconds: CPU time of the process for the model, building it included, ONNX excluded (CPU
            time rather than wall time: other jobs on the machine do not inflate it).
        onnx: the ONNX result of the window-mode conversion (of the first mode that converts when
            window mode is refused): ``exported`` (validated in ONNX
            Runtime at three sizes), ``failed`` or ``skipped`` (``None``: not run).
        onnx_reason: why the export failed or was skipped.
        onnx_error: ONNX Runtime vs PyTorch max abs error over the validated sizes.
        onnx_sizes: the ``(H, W)`` sizes validated in ONNX Runtime.
        onnx_seconds: CPU time for exporting and validating.
        onnx_mode: the mode that was exported.
    """

    entry: ZooEntry
    status: str
    reason: str = ""
    modes: Dict[str, str] = dataclasses.field(default_factory=dict)
    max_abs_error: Optional[float] = None
    max_rel_error: Optional[float] = None
    input_size: Optional[Tuple[int, ...]] = None
    probe_size: Optional[Tuple[int, int]] = None
    output_map: Optional[Tuple[int, ...]] = None
    seconds: float = 0.0
    onnx: Optional[str] = None
    onnx_reason: str = ""
    onnx_error: Optional[float] = None
    onnx_sizes: Optional[List[Tuple[int, int]]] = None
    onnx_seconds: float = 0.0
    onnx_mode: str = ""


# -- the model lists --------------------------------------------------------------------------


def torchvision_entries() -> List[ZooEntry]:
    """Every classifier in ``torchvision.models.list_models(module=torchvision.models)``."""
    import torchvision
    from torchvision.models import get_model_builder, get_model_weights

    entries = []
    for name in torchvision.models.list_models(module=torchvision.models):
        family = get_model_builder(name).__module__.rsplit(".", 1)[-1]
        try:
            gflops = get_model_weights(name).DEFAULT.meta.get("_ops")
        except (ValueError, AttributeError):
            gflops = None
        entries.append(ZooEntry("torchvision", name, family, TORCHVISION_NON_CNN.get(family, "cnn"), gflops))
    return entries


def timm_families() -> Dict[str, List[str]]:
    """``timm.list_models()`` grouped by the module that defines each model."""
    import timm
    from timm.models._registry import _model_to_module

    families: Dict[str, List[str]] = {}
    for name in timm.list_models():
        families.setdefault(_model_to_module[name], []).append(name)
    return families


def timm_entries() -> List[ZooEntry]:
    """The representatives of every timm family (see :data:`TIMM_REPRESENTATIVES`)."""
    entries = []
    for family, names in sorted(timm_families().items()):
        chosen = TIMM_REPRESENTATIVES.get(family) or (next((n for n in names if not n.startswith("test_")), names[0]),)
        kind = TIMM_NON_CNN.get(family, "cnn")
        entries += [ZooEntry("timm", name, family, kind) for name in chosen if name in names]
    return entries


def select(entries: Iterable[ZooEntry], pattern: Optional[str] = None) -> List[ZooEntry]:
    """Entries whose name, ``library/name`` or family matches the glob ``pattern`` (or one of
    several, comma-separated: ``'swin*,dla*'``)."""
    entries = list(entries)
    if not pattern:
        return entries
    globs = [p.strip() for p in pattern.split(",") if p.strip()]
    return [e for e in entries if any(fnmatch.fnmatch(s, g) for s in (e.name, e.id, e.family) for g in globs)]


# -- checking one model -----------------------------------------------------------------------


def calibrate_batchnorm(model: nn.Module, size: Tuple[int, int], batch: int = 2, seed: int = 0) -> nn.Module:
    """Set batch-norm running statistics from one random batch at ``size``; returns ``model`` in eval mode.

    With random weights and fresh statistics the logits of deep networks can be tiny
    (torchvision's EfficientNets give ~1e-14), so any comparison with them passes. Statistics
    taken from the data the model then sees keep every layer, and the logits, of order one,
    which makes the verification errors in the table mean something.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: one batch sets the statistics
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model.train()(x)
    return model.eval()


def build_model(entry: ZooEntry) -> Tuple[nn.Module, Tuple[int, int]]:
    """The model with random weights and calibrated batch-norm statistics in eval mode, and its training size."""
    from ._models import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, size = load_model(f"{entry.library}/{entry.name}")
        image_size = getattr(model, "image_size", None)
        if entry.library == "torchvision" and isinstance(image_size, int) and size and image_size != size[0]:
            # torchvision builds vit_h_14 for 224 without weights; its weights are for 518
            import torchvision

            model = torchvision.models.get_model(entry.name, image_size=size[0])
        size = size or (224, 224)
        torch.manual_seed(0)
        calibrate_batchnorm(model, size)
    return model, size


def check(entry: ZooEntry, modes: Sequence[str] = MODES, batch: int = 1, onnx: Union[bool, str] = False) -> ZooResult:
    """Build ``entry``, convert it in every mode from one trace, verify, and free it.

    With ``onnx``, the window-mode conversion (or the first mode that converts) is also exported
    with :func:`fcnify.export_onnx` and validated in ONNX Runtime at three sizes; ``onnx="cnn"`` exports CNNs only (the
    dynamo exporter can take tens of CPU-minutes on an attention model: DaViT-tiny, 27). Never raises for a model that fails: the
    error goes into the result.
    """
    from ._convert import build, prepare

    start = time.process_time()
    result = ZooResult(entry, "failed")
    model = traced = fcn = None
    try:
        model, size = build_model(entry)
        with torch.no_grad():
            traced = prepare(model, size, modes=modes, batch=batch)
            result.input_size, result.probe_size = traced.size, traced.probe
            errors = []
            for mode in modes:
                try:
                    fcn = build(traced.model, traced, mode)
                except UnsupportedModelError as err:
                    result.modes[mode] = "refused"
                    errors.append(err)
                    continue
                except Exception as err:  # a bug in fcnify or a model fcnify should handle
                    result.modes[mode] = "failed"
                    errors.append(err)
                    continue
                report = fcn.conversion_report
                result.modes[mode] = "exact"
                checked = [o for o in report.verification.outputs if o.check != "none"]
                result.max_abs_error = max([result.max_abs_error or 0.0] + [o.max_abs_error for o in checked])
                result.max_rel_error = max([result.max_rel_error or 0.0] + [o.max_rel_error for o in checked])
                if mode == "window" or result.output_map is None:
                    result.output_map = tuple(report.probe_output_shapes[0][1:])
                if onnx and result.onnx is None:  # window mode, or the first mode that converts
                    if onnx == "cnn" and entry.kind != "cnn":
                        result.onnx, result.onnx_reason = "skipped", f"not exported: {entry.kind} (--onnx cnn)"
                    else:
                        _check_onnx(fcn, result)
                        result.onnx_mode = mode
                fcn = None
        result.status = _status(result.modes)
        if errors:
            result.reason = "; ".join(dict.fromkeys(_reason(e) for e in errors))
    except (UnsupportedModelError, TraceError) as err:  # fcnify explains why it cannot convert
        result.status, result.reason = "refused", _reason(err)
    except Exception as err:
        result.status, result.reason = "failed", _reason(err)
    finally:
        del model, traced, fcn
        gc.collect()
    result.seconds = time.process_time() - start - result.onnx_seconds
    return result


def _check_onnx(fcn: nn.Module, result: ZooResult) -> None:
    """Export ``fcn`` to a temporary file, validate it in ONNX Runtime, and fill ``result.onnx*``."""
    import tempfile

    from .onnx import export_onnx

    start = time.process_time()
    with tempfile.TemporaryDirectory(prefix="fcnify-zoo-") as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            report = export_onnx(fcn, os.path.join(folder, "model.onnx"))
            result.onnx, result.onnx_error, result.onnx_sizes = "exported", report.max_abs_error, report.sizes
        except Exception as err:  # ExportError explains itself; an exporter crash keeps its type name
            result.onnx, result.onnx_reason = "failed", _reason(err).replace(os.path.join(folder, ""), "")
    result.onnx_seconds = time.process_time() - start


def _status(modes: Dict[str, str]) -> str:
    states = set(modes.values())
    if states == {"exact"}:
        return "exact"
    if "failed" in states:
        return "failed"
    return "partial" if "exact" in states else "refused"


def _reason(err: BaseException) -> str:
    """The error's message (what, where, and the hint) on one line."""
    text = " ".join(str(err).split())
    if not isinstance(err, FcnifyError):
        text = f"{type(err).__name__}: {text}"
    return text


def sweep(
    entries: Sequence[ZooEntry],
    modes: Sequence[str] = MODES,
    progress: bool = True,
    on_result: Optional[Callable[[ZooResult], None]] = None,
    onnx: Union[bool, str] = False,
    jobs: int = 1,
    threads: Optional[int] = None,
) -> List[ZooResult]:
    """:func:`check` each entry, with a tqdm progress bar; returns the results in entry order.

    With ``jobs > 1`` the models are checked in that many worker processes, each started
    fresh for one model (so memory is returned to the system after every model) and limited
    to ``threads`` torch threads.
    """
    from tqdm import tqdm

    task = functools.partial(check, modes=modes, onnx=onnx)
    results = []
    bar = tqdm(total=len(entries), disable=not progress, unit="model", dynamic_ncols=True, file=sys.stderr)
    pool = None
    if jobs > 1:
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(
            jobs, initializer=_init_worker, initargs=(threads,), maxtasksperchild=1
        )
        outcomes = pool.imap(task, entries)
    else:
        outcomes = map(task, entries)
    try:
        for entry, result in zip(entries, outcomes):
            bar.set_postfix_str(entry.id)
            bar.update()
            results.append(result)
            if on_result is not None:
                on_result(result)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    return results


def _init_worker(threads: Optional[int]) -> None:
    if threads:
        torch.set_num_threads(threads)
    warnings.simplefilter("ignore")


# -- the table --------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _short(reason: str, limit: int = 400) -> str:
    return reason if len(reason) <= limit else reason[: limit - 3].rstrip() + "..."


def _onnx_cell(r: ZooResult) -> str:
    if r.onnx == "exported":
        mode = f", {r.onnx_mode} mode" if r.onnx_mode and r.onnx_mode != "window" else ""
        return f"{r.onnx_error:.1e} at {len(r.onnx_sizes or [])} sizes ({r.onnx_seconds:.0f} s{mode})"
    if r.onnx == "failed":
        return f"failed: {_short(r.onnx_reason, 300)}"
    if r.onnx == "skipped":
        return r.onnx_reason
    return "not converted" if r.status != "exact" else ""


def _row(r: ZooResult, onnx: bool = False) -> str:
    status = r.status
    if r.status != "exact":
        detail = ", ".join(f"{m} {s}" for m, s in r.modes.items()) if r.status == "partial" else ""
        status = f"{r.status}{' (' + detail + ')' if detail else ''}: {_short(r.reason)}"
    error = f"{r.max_abs_error:.1e}" if r.max_abs_error is not None else ""
    if r.max_rel_error is not None and r.max_abs_error is not None and r.max_abs_error > 1e-3:
        error += f" (rel {r.max_rel_error:.1e})"
    size = "x".join(map(str, r.input_size[1:])) if r.input_size else ""
    out = ""
    if r.output_map is not None and r.probe_size is not None:
        out = f"{'x'.join(map(str, r.output_map))} at {r.probe_size[0]}x{r.probe_size[1]}"
    cells = [f"`{r.entry.name}`", r.entry.family, r.entry.kind, size, status, error, out, f"{r.seconds:.1f}"]
    if onnx:
        cells.append(_onnx_cell(r))
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def summary(results: Sequence[ZooResult], library: str) -> str:
    """``68/68 CNNs exact; transformers: 6 exact, 5 refused`` for one library."""
    mine = [r for r in results if r.entry.library == library]
    cnn = [r for r in mine if r.entry.kind == "cnn"]
    others = [r for r in mine if r.entry.kind != "cnn"]
    unit = "models" if library == "torchvision" else "family representatives"
    text = f"{sum(r.status == 'exact' for r in cnn)}/{len(cnn)} CNN {unit} exact"
    if others:
        counts: Dict[str, int] = {}
        for r in others:
            counts[r.status] = counts.get(r.status, 0) + 1
        text += f"; {len(others)} transformer, hybrid or MLP {unit}: " + ", ".join(
            f"{n} {s}" for s, n in sorted(counts.items())
        )
    tried = [r for r in mine if r.onnx in ("exported", "failed")]
    if tried:
        text += (
            f"; ONNX: {sum(r.onnx == 'exported' for r in tried)}/{len(tried)} converted models exported and validated"
        )
    return text


def coverage_markdown(results: Sequence[ZooResult], command: str = "fcnify zoo") -> str:
    """The coverage table as Markdown, one section per library; an ONNX column when it was run."""
    import torchvision
    import timm

    onnx = any(r.onnx is not None for r in results)
    lines = [
        "# Model coverage",
        "",
        f"torch {torch.__version__.split('+')[0]}, torchvision "
        f"{torchvision.__version__.split('+')[0]}, timm {timm.__version__}. Random weights with batch-norm "
        "statistics taken from one random batch (so that logits are of order one and errors mean something), "
        "eval mode, batch 1, float32 on CPU. Each model is converted in `window`, `dense` and `global` mode and "
        "verified at its training size; *exact* means every mode reproduces the original logits within "
        "1e-4 of the largest logit (in `dense` mode after a non-affine head no exact check exists and only "
        "the shapes are checked). *Max error* is the largest absolute error over the modes. *Output map* is "
        "the window-mode output `K x h x w` at a larger, non-square input. *CPU time* (of the process, so "
        "other jobs on the machine do not inflate it) covers building the model, calibrating its statistics, "
        "converting it in the three modes and verifying.",
        "",
    ]
    if onnx:
        lines += [
            "*ONNX*: the window-mode conversion (or, when window mode is refused, the first mode that "
            "converts) exported with `fcnify.export_onnx` (dynamo exporter, symbolic "
            "batch, height and width), checked with `onnx.checker` and run in ONNX Runtime at the training "
            "size, a larger non-square size and an odd size; the cell gives the largest ONNX Runtime vs "
            "PyTorch difference over those sizes and the CPU time to export and validate.",
            "",
        ]
    sections = [
        _section(
            library,
            [f"Generated by `{command}`."],
            summary(results, library),
            [_row(r, onnx) for r in results if r.entry.library == library],
            onnx,
        )
        for library in ("torchvision", "timm")
        if any(r.entry.library == library for r in results)
    ]
    return "\n".join(lines) + "\n".join(sections)


def _section(library: str, made_by: List[str], counts: str, rows: List[str], onnx: bool) -> str:
    lines = [f"## {library}", ""]
    for line in made_by:
        lines += [line, ""]
    lines += [f"**{counts}.**", ""]
    if library == "timm":
        lines += ["One model per family (the module that defines it), plus the variants whose heads differ.", ""]
    header = ["model", "family", "kind", "training size", "status", "max error", "output map", "CPU time (s)"]
    header += ["ONNX"] if onnx else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *rows]
    return "\n".join(lines) + "\n"


def merge_sections(old: str, new: str) -> str:
    """``new`` with the library sections it lacks taken from ``old`` (a sweep of one library
    rewrites its own section of an existing table and keeps the other)."""
    preamble, fresh = _split_sections(new)
    _, kept = _split_sections(old)
    merged = {**{k: v for k, v in kept.items() if k in ("torchvision", "timm")}, **fresh}
    order = [k for k in ("torchvision", "timm") if k in merged]
    return preamble + "\n".join(merged[k] for k in order)


def merge_rows(old: str, results: Sequence[ZooResult], command: str) -> str:
    """``old`` with the rows of ``results`` replaced (or added): the table after a sweep of some models.

    The other rows are kept as they are, each library's summary line is counted again from
    all its rows, and the section records ``command`` under the one that made it.
    """
    preamble, sections = _split_sections(old)
    onnx = any(r.onnx is not None for r in results) or "| ONNX |" in old
    if onnx and "| ONNX |" not in old:  # the preamble explains the new column
        preamble = coverage_markdown(results, command).split("\n## ", 1)[0] + "\n"
    for library in ("torchvision", "timm"):
        mine = [r for r in results if r.entry.library == library]
        if not mine:
            continue
        lines = sections.get(library, "").splitlines()
        made_by = [line for line in lines if line.startswith(("Generated by", "Rows of"))]
        note = f"Rows of the models it matches re-checked by `{command}`."
        made_by = [line for line in made_by if line != note] + [note] if made_by else [f"Generated by `{command}`."]
        rows = {_row_name(line): _pad(line, onnx) for line in lines if line.startswith("| `")}
        rows.update({r.entry.name: _row(r, onnx) for r in mine})
        counted = [_parse_row(row, library) for row in rows.values()]
        sections[library] = _section(library, made_by, summary(counted, library), list(rows.values()), onnx)
    order = [k for k in ("torchvision", "timm") if k in sections]
    return preamble + "\n".join(sections[k] for k in order)


def _split_sections(text: str) -> Tuple[str, Dict[str, str]]:
    parts = re.split(r"^(?=## )", text, flags=re.M)
    sections = {p.splitlines()[0][3:].strip(): p.rstrip("\n") + "\n" for p in parts[1:]}
    return parts[0], sections


def _row_name(row: str) -> str:
    return row.split("|")[1].strip().strip("`")


def _pad(row: str, onnx: bool) -> str:
    """A row of a table without the ONNX column, given an empty ONNX cell."""
    return row + "  |" if onnx and row.count("|") - row.count("\\|") == 9 else row


def _parse_row(row: str, library: str) -> ZooResult:
    """The counts a table row holds (kind, status, ONNX outcome), for :func:`summary`."""
    cells = [c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]]
    name, family, kind, status = cells[0].strip("`"), cells[1], cells[2], cells[4]
    result = ZooResult(ZooEntry(library, name, family, kind), status.split(":")[0].split(" (")[0])
    cell = cells[8] if len(cells) > 8 else ""
    if cell.startswith("failed"):
        result.onnx = "failed"
    elif re.match(r"[0-9.e+-]+ at ", cell):
        result.onnx = "exported"
    elif cell.startswith("not exported"):
        result.onnx = "skipped"
    return result


# -- command line -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``zoo`` options, shared by ``fcnify zoo`` and ``python -m fcnify.zoo``."""
    parser.add_argument("--torchvision", action="store_true", help="sweep torchvision (default: both libraries)")
    parser.add_argument("--timm", action="store_true", help="sweep one model per timm family")
    parser.add_argument(
        "--filter",
        metavar="PATTERN",
        help="glob on model name, library/name or family, e.g. 'resnet*'; several, comma-separated: 'swin*,dla*'",
    )
    parser.add_argument("--kind", metavar="KINDS", help="comma-separated kinds to sweep: cnn, transformer, hybrid, mlp")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated modes (default: all three)")
    parser.add_argument(
        "-o",
        "--output",
        metavar="PATH",
        help="write the Markdown table here (e.g. docs/coverage.md); "
        "a sweep of one library (--torchvision or --timm) replaces that library's section of an "
        "existing file and keeps the other; a sweep of some models (--filter, --kind) replaces "
        "their rows and keeps the others",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="check N models at a time, each in "
        "its own process (default 1); combine with --threads so that N x threads <= cores",
    )
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch CPU threads (1 is much faster on a "
        "machine shared with other jobs: busy cores make multi-threaded kernels stall)",
    )
    parser.add_argument(
        "--onnx",
        nargs="?",
        const="all",
        choices=("all", "cnn"),
        help="also export each "
        "window-mode conversion to ONNX and validate it in ONNX Runtime at three sizes (an ONNX "
        "column in the table); '--onnx cnn' exports the CNNs only (attention models can take tens "
        "of CPU-minutes each in the exporter)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the sweep the arguments describe; print the summary; exit status 1 if a model failed."""
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise FcnifyError(f"unknown mode(s) {', '.join(unknown) or '(none)'}. Hint: --modes {','.join(MODES)}")
    if args.jobs < 1 or (args.threads is not None and args.threads < 1):
        raise FcnifyError(f"--jobs and --threads must be at least 1, got --jobs {args.jobs} --threads {args.threads}.")
    if args.threads:
        torch.set_num_threads(args.threads)
    both = not args.torchvision and not args.timm
    entries: List[ZooEntry] = []
    if args.torchvision or both:
        entries += torchvision_entries()
    if args.timm or both:
        entries += timm_entries()
    entries = select(entries, args.filter)
    if args.kind:
        kinds = [k.strip() for k in args.kind.split(",") if k.strip()]
        unknown = [k for k in kinds if k not in KINDS]
        if unknown or not kinds:
            raise FcnifyError(
                f"unknown kind(s) {', '.join(unknown) or '(none)'} in --kind {args.kind}. "
                f"Hint: --kind {','.join(KINDS)}"
            )
        entries = [e for e in entries if e.kind in kinds]
    if not entries:
        raise FcnifyError(
            f"no model matches --filter {args.filter!r} --kind {args.kind!r}. "
            "Hint: the pattern is a glob, e.g. 'resnet*'."
        )

    command = "fcnify zoo" + "".join(f" {a}" for a in _command_args(args))
    some = bool(args.filter or args.kind)  # the rows of these models, not whole sections
    done: List[ZooResult] = []

    def report(r: ZooResult) -> None:
        done.append(r)
        if args.no_progress:
            print(f"{r.entry.id}: {r.status} {r.reason[:200]}", file=sys.stderr, flush=True)
        if args.output:  # rewritten after every model: an interrupted sweep keeps what it did
            text = coverage_markdown(done, command)
            if os.path.exists(args.output):  # read again: a sweep of the other library may be writing it too
                with open(args.output) as f:
                    old = f.read()
                text = merge_rows(old, done, command) if some else merge_sections(old, text)
            with open(args.output, "w") as f:
                f.write(text)

    results = sweep(
        entries,
        modes,
        progress=not args.no_progress,
        on_result=report,
        onnx=args.onnx,
        jobs=args.jobs,
        threads=args.threads,
    )
    for library in ("torchvision", "timm"):
        if any(r.entry.library == library for r in results):
            print(f"{library}: {summary(results, library)}")
    for r in results:
        if r.status == "failed":
            print(f"failed: {r.entry.id}: {_short(r.reason, 300)}")
        if r.onnx == "failed":
            print(f"ONNX failed: {r.entry.id}: {_short(r.onnx_reason, 300)}")
    if args.output:
        print(f"wrote {args.output}")
    return 1 if any(r.status == "failed" or r.onnx == "failed" for r in results) else 0


def _command_args(args: argparse.Namespace) -> List[str]:
    out = []
    if args.torchvision:
        out.append("--torchvision")
    if args.timm:
        out.append("--timm")
    if args.filter:
        out.append(f"--filter '{args.filter}'")
    if args.kind:
        out.append(f"--kind {args.kind}")
    if args.modes != ",".join(MODES):
        out.append(f"--modes {args.modes}")
    if args.onnx:
        out.append("--onnx" if args.onnx == "all" else f"--onnx {args.onnx}")
    if args.jobs > 1:
        out.append(f"--jobs {args.jobs}")
    if args.threads:
        out.append(f"--threads {args.threads}")
    if args.output:
        out.append(f"-o {args.output}")
    return out


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m fcnify.zoo [--torchvision] [--timm] [--filter PATTERN] [-o docs/coverage.md]``."""
    parser = argparse.ArgumentParser(prog="python -m fcnify.zoo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except FcnifyError as err:
        print(f"fcnify zoo: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
