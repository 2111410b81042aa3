"""The ``hald-store`` command line: a thin click layer over the Python API.

Only click and torch-free modules are imported at the top: each command imports what it runs,
so ``--help`` and ``--version`` start without torch."""

from __future__ import annotations

import functools
import json
import re
import sys

import click

from .choices import IMAGENET_MEAN, IMAGENET_STD, LAYOUTS, MIXES, TEACHER_MODES
from . import __version__
from .errors import HaldStoreError, StoreError, environment_failure
from .options import BACKENDS, RenderOptions


class _ValueCodecs(click.Choice):
    """``--values``: the registered value codecs, looked up when first needed (the registry
    imports torch), so that ``hald-store --help`` and ``--version`` do not."""

    def __init__(self) -> None:
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:
        from .codec import VALUE_CODECS

        return tuple(VALUE_CODECS)


def flag_message(error: HaldStoreError, command: click.Command) -> str:
    """``error``'s message with the parameters it names (``error.options``) written as
    ``command``'s flags: ``top_k=7`` -> ``--top-k 7``, ``resume=True`` -> ``--resume`` and, where
    the message has no ``name=`` form of it, a bare ``crops_per_image`` -> ``--crops-per-image``
    (so ``device='tpu': not a device`` keeps its prose). Parameters without a flag stay as they are."""
    flags = {p.name: max(p.opts, key=len) for p in command.params if isinstance(p, click.Option)}
    message = str(error)
    for name in (n for n in error.options if n in flags):
        flag = flags[name]
        assigned = re.compile(rf"(?<![\w-]){name}=(?:'([^']*)'|([^\s,;)']+))")
        if assigned.search(message):
            message = assigned.sub(lambda m: flag if m[2] == "True" else f"{flag} {m[1] if m[1] is not None else m[2]}",
                                   message)
        else:
            message = re.sub(rf"(?<![\w-]){name}(?![\w-])", flag, message)
    return message


_OUTPUTS = ("out_store", "out_dir", "dst", "manifest", "store")  # the parameters naming what a command writes


def _friendly_errors(fn):
    """Turn library errors and environment failures (full disk, read-only file system, too many
    open files, out of memory) into a one-line ``Error: ...`` (parameters named as flags), exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (OSError, MemoryError, HaldStoreError) as e:
            path = next((str(kwargs[k]) for k in _OUTPUTS if kwargs.get(k)), None)
            failure = next(filter(None, (environment_failure(c, path) for c in _causes(e))), None)
            if failure is None and not isinstance(e, HaldStoreError):
                raise
            raise click.ClickException(_message(failure or e)) from e

    return wrapper


def _causes(error: BaseException):
    """``error`` and the exceptions it was raised from (a store error caused by a full disk is the full disk)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _message(error: HaldStoreError) -> str:
    ctx = click.get_current_context(silent=True)
    return str(error) if ctx is None else flag_message(error, ctx.command)


def _teacher_options(required: bool):
    """--teacher, --checkpoint, --num-classes and --random-init, shared by build and verify."""
    need = "" if required else "--deep: "

    def apply(fn):
        fn = click.option("--random-init", is_flag=True,
                          help=f"{need}Use the teacher with random weights on purpose (no --checkpoint).")(fn)
        fn = click.option("--num-classes", type=int, default=None,
                          help=f"{need}Teacher output width [default: the number of classes].")(fn)
        fn = click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
                          help=f"{need}Weights for the teacher (state dict, or a dict with 'state_dict').")(fn)
        return click.option("--teacher", required=required, default=None,
                            help=f"{need}cifar_resnet20/56/..., a torchvision model name, or package.module:factory.")(fn)

    return apply


def _normalization_options(fn):
    """--mean and --std, shared by build and import (verify uses the store's)."""
    fn = click.option("--std", type=float, nargs=3, default=IMAGENET_STD, help="Normalization std (RGB, 0-1).")(fn)
    return click.option("--mean", type=float, nargs=3, default=IMAGENET_MEAN, help="Normalization mean (RGB, 0-1).")(fn)


def _load_teacher(teacher: str, checkpoint: str | None, num_classes: int, random_init: bool):
    """The teacher, refusing to run on random weights unless --random-init says so."""
    from .models import load_teacher

    if checkpoint is not None and random_init:
        raise click.UsageError("--checkpoint and --random-init contradict each other; pass one")
    model = load_teacher(teacher, checkpoint, num_classes)
    if checkpoint is None and not random_init:
        raise click.UsageError(f"no --checkpoint: teacher {teacher!r} would label with random weights; pass its "
                               "weights with --checkpoint, or --random-init to use random weights on purpose")
    return model


def _device_option(fn):
    return click.option("--device", default=RenderOptions.device, show_default=True,
                        help="auto, cpu, cuda or cuda:N.")(fn)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(version=__version__, prog_name="hald-store")  # not importlib.metadata: runs uninstalled
def main() -> None:
    """Compact teacher soft-label stores with exact crop replay."""


@main.command()
@click.argument("images_dir", type=click.Path(file_okay=False))
@click.argument("out_store", type=click.Path())
@_teacher_options(required=True)
@click.option("--crops-per-image", "-s", type=int, default=None, help="Stored crops per image.")
@click.option("--slc", type=int, default=None, help="Soft labels per class (instead of --crops-per-image).")
@click.option("--top-k", type=int, default=5, help="Classes kept per crop.")
@click.option("--values", type=_ValueCodecs(), default="uint8", help="How the logit gaps are stored.")
@click.option("--temperature", type=float, default=20.0, help="Build temperature (the rest-class mass is exact at it).")
@click.option("--input-size", type=int, default=224, help="Side of the square crops fed to the teacher.")
@click.option("--scale", type=float, nargs=2, default=(0.08, 1.0), help="RandomResizedCrop area range MIN MAX.")
@click.option("--ratio", type=float, nargs=2, default=(3 / 4, 4 / 3), help="Aspect ratio range MIN MAX.")
@click.option("--flip-prob", type=float, default=0.5, help="Probability of a horizontal flip.")
@click.option("--seed", type=int, default=0, help="Crop plan seed.")
@click.option("--batch-size", type=int, default=256, help="Teacher batch size.")
@_device_option
@_normalization_options
@click.option("--backend", type=click.Choice(("auto", *BACKENDS)), default=RenderOptions.backend,
              help="Crop renderer (the same one training uses).")
@click.option("--workers", type=int, default=RenderOptions.workers,
              help="Rendering threads (DALI, pillow) or worker processes (torchvision) [default: this process's cores].")
@click.option("--manifest", type=click.Path(dir_okay=False), default=None,
              help="Reuse a scan made by 'hald-store scan' instead of scanning IMAGES_DIR again.")
@click.option("--chunk-images", type=int, default=1024, help="Images per chunk (the unit of writing and resuming).")
@click.option("--layout", type=click.Choice(LAYOUTS), default="block",
              help="sharded: one file per chunk of images, an inner chunk per crop seed; an epoch reads ~1/S of the "
                   "labels, each rank only its chunks (per-crop labels only).")
@click.option("--resume", is_flag=True, help="Continue an interrupted build with the same settings.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
@click.option("--skip-bad", is_flag=True, help="Skip (and record) unreadable images instead of failing.")
@click.option("--teacher-mode", type=click.Choice(TEACHER_MODES), default="eval",
              help="train: BatchNorm uses each labelling batch's statistics (batch-specific labels).")
@click.option("--mix", type=click.Choice(MIXES), default="none",
              help="Mix images inside each labelling batch before the teacher sees them (recorded for replay).")
@click.option("--mix-alpha", type=float, default=None, help="Beta(alpha, alpha) of the mix [default: 1.0].")
@click.option("--labelling-batch-size", type=int, default=None,
              help="Batch size of batch-specific labelling (= the training batch size at replay) [default: --batch-size].")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@_friendly_errors
def build(images_dir, out_store, teacher, checkpoint, random_init, scale, ratio, flip_prob, quiet, **options) -> None:
    """Label planned crops of IMAGES_DIR (ROOT/<class>/<image>) with a teacher into OUT_STORE."""
    from . import distributed
    from .build import BuildConfig, build_store
    from .crop_plan import CropPolicy
    from .images import class_names

    try:
        policy = CropPolicy(scale=tuple(scale), ratio=tuple(ratio), flip_prob=flip_prob)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e
    config = BuildConfig(teacher_name=teacher, crop_policy=policy, progress=not quiet, **options)
    config.check()  # before loading the teacher
    model = _load_teacher(teacher, checkpoint, config.num_classes or len(class_names(images_dir)), random_init)
    summary = build_store(images_dir, out_store, model, config)
    if distributed.context().is_main:
        click.echo(str(summary))


@main.command()
@click.argument("images_dir", type=click.Path(file_okay=False))
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--skip-bad", is_flag=True, help="Skip (and record) unreadable images instead of failing.")
@click.option("--workers", type=int, default=None, help="Threads [default: this process's cores].")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_friendly_errors
def scan(images_dir, manifest, skip_bad, workers, quiet) -> None:
    """Read, hash and decode every image of IMAGES_DIR once into MANIFEST (.npz), for
    'hald-store build --manifest' (under torchrun the ranks share the work)."""
    from . import distributed
    from .images import scan_image_folder

    ranks = distributed.context()
    m = scan_image_folder(images_dir, skip_bad=skip_bad, progress=not quiet, workers=workers, ranks=ranks)
    if ranks.is_main:
        m.save(manifest)
        click.echo(f"{len(m):,} images in {len(m.class_names):,} classes ({len(m.skipped)} skipped) -> {manifest}")


@main.command()
@click.argument("store", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_friendly_errors
def info(store, as_json) -> None:
    """Summarize a store (--json: every field, machine-readable)."""
    from .store import LabelStore

    opened = LabelStore.open(store, allow_incomplete=True)
    summary = {**opened.info(), "class_names": opened.class_names}
    click.echo(json.dumps(summary, indent=2) if as_json else "\n".join(_info_lines(summary)))


def _info_lines(i: dict) -> list[str]:
    """``hald-store info``'s text: one line per subject, in words."""
    names = i["class_names"]
    shown = ", ".join(names[:10]) + (f", ... ({len(names) - 10} more)" if len(names) > 10 else "")
    t = i["teacher"]
    sha = t.get("weights_sha256")
    extra = "".join(f", {k} {v}" for k, v in t.items() if k not in ("name", "weights_sha256", "mode"))
    state = "complete" if i["complete"] else (f"INCOMPLETE: {i['blocks_done']} of {i['num_blocks']} blocks written, "
                                              f"{i['missing_chunks']} chunk files missing")
    return [
        f"store      {i['path']} (format {i['format_version']}; {state}; "
        f"{'CRC32C checksums' if i['checksums'] else 'no checksums'})",
        f"images     {i['num_images']:,} in {i['num_classes']:,} classes: {shown}"
        + (f"; {i['skipped_images']} skipped as unreadable" if i["skipped_images"] else ""),
        f"crops      {i['crops_per_image']:,} per image, {i['num_crops']:,} in all; {i['input_size']} px, "
        f"crop plan seed {i['seed']}, renderer {i['backend']}",
        f"labels     top-{i['top_k']} {i['values']} at T={i['temperature']:g}",
        f"teacher    {t['name']} ({t['mode']} mode; weights SHA-256 "
        f"{sha[:12] + '...' if sha else 'not recorded'}{extra})",
        f"disk       {i['bytes_on_disk']:,} B in all ({i['bytes_per_crop']:.2f} B/crop); labels "
        f"{i['label_bytes_on_disk']:,} B ({i['label_bytes_per_crop']:.2f} B/crop with zarr metadata; "
        f"{i['raw_label_bytes_per_crop']} B/crop uncompressed, a full fp16 vector: "
        f"{i['reference_fp16_bytes_per_crop']} B/crop)",
    ]


@main.command()
@click.argument("store", type=click.Path())
@click.argument("images_dir", type=click.Path(file_okay=False), required=False)
@click.option("--deep", is_flag=True, help="Also re-run the teacher on sampled crops (needs IMAGES_DIR and --teacher).")
@_teacher_options(required=False)
@click.option("--sample", type=int, default=256, help="--deep: number of random crops to check.")
@click.option("--seed", type=int, default=0, help="--deep: seed for choosing the crops.")
@click.option("--batch-size", type=int, default=256, help="--deep: teacher batch size (per-crop stores).")
@_device_option
@click.option("--temperature", type=float, default=None, help="--deep: compare at this T [default: the build temperature].")
@click.option("--min-agreement", type=float, default=0.99, help="--deep: required top-1 agreement (0-1).")
@click.option("--check-hashes/--no-check-hashes", default=True, help="Re-hash IMAGES_DIR against the manifest.")
@click.option("--repair", is_flag=True,
              help="Mark the blocks of damaged label chunks unfinished, for `build --resume` to rewrite.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar during --deep (--json: none either).")
@_friendly_errors
def verify(store, images_dir, deep, teacher, checkpoint, num_classes, random_init, sample, seed, batch_size, device, temperature,
           min_agreement, check_hashes, repair, as_json, quiet) -> None:
    """Check STORE in three named steps, stopping at the first failure (exit 1): integrity (read
    every chunk: checksums, missing chunks), images (with IMAGES_DIR: the files match the
    manifest) and teacher (with --deep: re-run the teacher on regenerated crops)."""
    from .store import LabelStore
    from .verify import check_integrity, reopen_damaged_blocks, verify_store

    if deep and (images_dir is None or teacher is None):
        raise click.UsageError("--deep needs IMAGES_DIR and --teacher")
    if not deep and (teacher or checkpoint or num_classes or random_init):
        raise click.UsageError("--teacher, --checkpoint, --num-classes and --random-init are used by --deep only; "
                               "add --deep to re-run the teacher")
    opened = LabelStore.open(store, allow_incomplete=True)
    integrity = check_integrity(opened)
    result: dict = {"integrity": integrity.to_dict()}
    lines = [str(integrity)]
    passed = integrity.passed
    if repair and (integrity.damaged_blocks or not integrity.only_label_damage):
        try:
            result["reopened_blocks"] = blocks = reopen_damaged_blocks(store, integrity)
            lines.append(f"repair: block(s) {', '.join(map(str, blocks))} marked unfinished; rewrite them with "
                         f"`hald-store build IMAGES_DIR {store} --resume` and the build's flags")
        except StoreError as e:
            lines.append(f"repair: not possible: {e}")
    if not passed:
        lines.append("images    not checked (integrity failed)")
    elif images_dir is None:
        lines.append("images    not checked (give IMAGES_DIR to check the files against the manifest)")
    else:
        opened.check_images(images_dir, check_hashes=check_hashes)
        n = len(opened.manifest())
        result["images_checked"] = n
        lines.append(f"images    PASS: {n:,} files match the manifest ({'content hashes' if check_hashes else 'sizes'})")
    if passed and deep:
        model = _load_teacher(teacher, checkpoint, num_classes or opened.num_classes, random_init)
        report = verify_store(opened, images_dir, model, sample=sample, seed=seed, batch_size=batch_size,
                              device=device, temperature=temperature, min_agreement=min_agreement,
                              check_hashes=False, progress=not (quiet or as_json))  # images just checked
        result.update(report.to_dict())
        lines.append(str(report))
        passed = report.passed
    else:
        lines.append("teacher   not checked (" + ("integrity failed)" if not passed else
                                                   "add --deep --teacher ... to re-run the teacher on stored crops)"))
    result["passed"] = passed
    click.echo(json.dumps(result, indent=2) if as_json else "\n".join(lines))
    if not passed:
        sys.exit(1)


@main.command()
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("--top-k", type=int, required=True, help="Classes kept per crop (at most the source's).")
@click.option("--values", type=_ValueCodecs(), required=True, help="How the logit gaps are stored.")
@click.option("--overwrite", is_flag=True, help="Replace DST.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_friendly_errors
def convert(src, dst, top_k, values, overwrite, quiet) -> None:
    """Re-encode the labels of store SRC into DST with another --top-k / --values."""
    from .convert import reencode_store
    from .store import LabelStore

    before = LabelStore.open(src).bytes_on_disk("labels")
    out = reencode_store(src, dst, top_k=top_k, values=values, overwrite=overwrite, progress=not quiet)
    after = out.bytes_on_disk("labels")
    click.echo(f"label bytes {before:,} -> {after:,} ({after / max(before, 1):.2f}x), "
               f"{after / out.num_crops:.2f} B/crop")


@main.command("import")
@click.argument("labels_dir", type=click.Path(file_okay=False))
@click.argument("images_dir", type=click.Path(file_okay=False))
@click.argument("out_store", type=click.Path())
@click.option("--num-classes", type=int, default=None, help="Expected label width [default: the files' width].")
@click.option("--top-k", type=int, default=5, help="Classes kept per crop.")
@click.option("--values", type=_ValueCodecs(), default="uint8", help="How the logit gaps are stored.")
@click.option("--temperature", type=float, default=20.0, help="Temperature T of the reference softmax(logits / T).")
@click.option("--input-size", type=int, default=224, help="Side of the square crops the labels were made on.")
@_normalization_options
@click.option("--mix", type=click.Choice(MIXES), default=None,
              help="Mix of the labelling batches [default: what the files record].")
@click.option("--teacher-mode", type=click.Choice(TEACHER_MODES), default="train",
              help="How the teacher's BatchNorm ran (recorded only).")
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@_friendly_errors
def import_(labels_dir, images_dir, out_store, quiet, **options) -> None:
    """Import reference soft labels (LABELS_DIR/epoch_<e>.tar, SRe2L/LPLD/HALD layout) of IMAGES_DIR into OUT_STORE."""
    from .importer import import_reference

    summary = import_reference(labels_dir, images_dir, out_store, progress=not quiet, **options)
    click.echo(str(summary))


@main.command()
@click.argument("store", type=click.Path())
@click.argument("images_dir", type=click.Path(exists=True, file_okay=False), required=False)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for drift.json, the CSV and PNGs.")
@click.option("--temperature", "-T", type=float, default=None, help="Softmax temperature [default: the store's].")
@click.option("--top", type=int, default=16, help="Most drifting crops kept (and drawn with IMAGES_DIR).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_friendly_errors
def drift(store, images_dir, out, temperature, top, quiet) -> None:
    """Per-image drift of STORE's crop labels (trace of their covariance, off-class and off-majority
    top-1 shares) into --out; with IMAGES_DIR, a gallery of the --top most drifting crops."""
    from .drift import measure_drift, write_drift

    report = measure_drift(store, temperature=temperature, top=top, progress=not quiet)
    written = write_drift(report, out, images_dir)
    click.echo(f"{report}\nwrote {', '.join(p.name for p in written)} to {out}")


if __name__ == "__main__":
    main()
