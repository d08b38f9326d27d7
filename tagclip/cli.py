"""Command line: ``classify.py`` (the paper's flags and more), ``tagclip tag`` and ``tagclip demo``.

Every flag that changes numbers defaults to the paper's setting. Bad input ends the run with
one ``error: <file>: <problem>`` line and exit status 2; with ``--on_error skip`` unreadable
images are listed at the end and the exit status is 1.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm import tqdm

from . import distributed
from .errors import EXIT_INTERRUPTED, InputError, Interrupted
from .journal import CACHE_ENV, ScoreJournal, file_stamp, folder_lock, run_key
from .images import DEFAULT_MAX_SIDE, iter_image_files, load_model_input
from .labels import SplitEntry, check_scores_path, label_file_lines, label_file_name, labels_to_onehot, read_split, \
    writable_dir, write_scores, write_text_atomic
from .metrics import f1_overall, format_metrics, mean_average_precision
from .registry import DATASETS, get_dataset
from .tagger import DEFAULT_BATCH_SIZE, Tagger, check_vocabulary

RULE = "=" * 48
PRECISION_CHOICES = ("fp32", "fp16", "bf16")  # clip.PRECISIONS
DEFAULT_PRECISION = "fp32"  # the paper's setting, for every stage and device
EXIT_SKIPPED_IMAGES = 1   # the run finished, but some images failed and were skipped (--on_error skip)
EXIT_INPUT_ERROR = 2      # bad input or arguments stopped the run (one "error:" line)
EXIT_INTERNAL_ERROR = 70  # a bug (traceback shown); sysexits.h's EX_SOFTWARE
SPLIT_IMAGE_EXT = ".jpg"  # SPEC §8: image file = {img_root}/{id}.jpg
CUSTOM_LABEL_FILE = "custom_val_tagclip.txt"
# The smallest --max_side: one 16-pixel patch.
MIN_MAX_SIDE = 16


def _int_at_least(low: int):
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)
max_side_value = _int_at_least(MIN_MAX_SIDE)


def parse_word_list(value: Optional[str]) -> list[str]:
    """A file with one name per line, or a comma-separated list."""
    if not value:
        return []
    path = Path(value)
    if path.is_file():
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(path, f"cannot read word list: {err}") from None
        words = [w.strip() for w in lines if w.strip()]
        if not words:
            raise InputError(path, "word list is empty")
    else:
        words = [w.strip() for w in value.split(",") if w.strip()]
        if not words:
            raise InputError(value, "no class names given")
    return words


def user_vocabulary(classes: Optional[str], background: Optional[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``--classes`` and ``--background`` read and checked (:func:`tagclip.tagger.check_vocabulary`);
    a problem is an InputError naming the flag's value (the file or the list) it is in."""
    try:
        names, _ = check_vocabulary(parse_word_list(classes))
    except ValueError as err:
        raise InputError(classes, str(err)) from None
    try:
        return check_vocabulary(names, parse_word_list(background))
    except ValueError as err:
        raise InputError(background, str(err)) from None


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model flags of every tagging command (``classify.py``, ``tagclip tag``, ``tagclip segment``)."""
    p.add_argument("--model_path", default="ViT-B/16",
                   help="OpenAI model name (downloaded to the cache, SHA256 checked) or a checkpoint file "
                        "(TorchScript archive, state dict or .npz)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default=DEFAULT_PRECISION,
                   help="model weights in float32 (default, the paper's setting), float16 or bfloat16; "
                        "attention maps, LayerNorms and every TagCLIP step after the forwards stay float32 "
                        "(bf16: mean score drift ~1e-3 on the test fixtures, a crop or box threshold can flip; "
                        "see README 'Precision')")
    p.add_argument("--model_cache", default=None, help="checkpoint cache folder (default ~/.cache/clip)")
    p.add_argument("--no_text_cache", action="store_true", help="do not read or write cached text features")
    add_checkpoint_code_argument(p)


def add_image_arguments(p: argparse.ArgumentParser) -> None:
    """How images are batched, read and skipped, in every tagging command."""
    p.add_argument("--batch_size", type=positive_int, default=DEFAULT_BATCH_SIZE,
                   help="images of equal size per forward pass (default %(default)s)")
    p.add_argument("--on_error", choices=("stop", "skip"), default="stop",
                   help="on an image that cannot be read: stop at once (default) or skip it and report at "
                        "the end (exit status 1)")
    p.add_argument("--max_side", type=max_side_value, default=DEFAULT_MAX_SIDE,
                   help="downscale larger images to this longest side first (default %(default)s: "
                        "leaves every VOC/COCO image untouched)")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by ``classify.py`` and ``tagclip tag``."""
    add_model_arguments(p)
    p.add_argument("--classes", default=None,
                   help="open vocabulary: a file with one class name per line, or 'cat,dog,sofa'")
    p.add_argument("--background", default=None,
                   help="background words for --classes (file or comma list; default: none)")
    p.add_argument("--output_dir", default="./output", help="where the label file goes (default ./output)")
    p.add_argument("--scores_out", default=None,
                   help="write the score matrix: .npy (float32, rows in split order), "
                        ".csv (header of class names) or .json ({id: {class: score}})")
    add_image_arguments(p)
    p.add_argument("--exif_transpose", action="store_true",
                   help="honour EXIF orientation (off by default, as the reference and the dataset annotations)")
    p.add_argument("--workers", type=non_negative_int, default=0,
                   help="image-decoding worker processes (default 0: one background thread)")
    p.add_argument("--vis_dir", default=None,
                   help="also draw pictures into this folder: {id}.png (the image with its tags and scores) "
                        "and, with labels in the split file, ap_per_class.png (default: none)")


def classify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="classify.py", description="TagCLIP multi-label classification (SPEC §3-4).")
    p.add_argument("--dataset", default="voc2007", choices=list(DATASETS),
                   help="vocabulary, thresholds and label ids of a paper dataset (default voc2007)")
    p.add_argument("--img_root", required=True, help="image folder ({img_root}/{id}.jpg)")
    p.add_argument("--split_file", default=None,
                   help="'id l1 l2 ...' per line; without it every image in --img_root is tagged")
    p.add_argument("--save_file", action="store_true",
                   help="accepted for compatibility: the label file is always written")
    add_run_arguments(p)
    return p


class _Vocabulary:
    def __init__(self, args):
        self.dataset = get_dataset(args.dataset)
        if args.classes:
            self.names, self.background = user_vocabulary(args.classes, args.background)
            self.label_map, self.label_file = None, CUSTOM_LABEL_FILE
        else:
            if args.background:
                raise InputError(args.background, "--background needs --classes "
                                 "(dataset vocabularies bring their own background words)")
            self.names, self.background = list(self.dataset.class_names), list(self.dataset.background)
            self.label_map, self.label_file = self.dataset.split_label_map, label_file_name(args.dataset)


def _image_list(args, vocab: _Vocabulary) -> tuple[list[SplitEntry], list[Path], list[InputError]]:
    """The images of the run: (entries, paths, images refused by name).

    In folder mode an image whose name holds whitespace is refused (stop, or a skip with
    ``--on_error skip``): the label file's ``id l1 l2 ...`` lines cannot hold such an id, and
    ``generate_cams.py`` could not read it back. Split files cannot hold one either."""
    root = Path(args.img_root)
    if args.split_file:
        entries = read_split(args.split_file, num_classes=len(vocab.names), label_map=vocab.label_map)
        return entries, [root / f"{e.id}{SPLIT_IMAGE_EXT}" for e in entries], []
    entries, paths, refused = [], [], []
    for image_id, name in iter_image_files(root):
        if any(ch.isspace() for ch in image_id):
            err = InputError(root / name, "the file name holds whitespace, which label files (one 'id l1 l2 ...' "
                                          "line per image) cannot hold; rename the file")
            if args.on_error == "stop":
                raise err
            refused.append(err)
            continue
        entries.append(SplitEntry(image_id, ()))
        paths.append(root / name)
    if not entries:
        raise InputError(root, "no image has a name a label file can hold")
    return entries, paths, refused


def _load_chunk(paths: Sequence[Path], args) -> list:
    """Model inputs, or the InputError of each image that could not be read."""
    out = []
    for path in paths:
        try:
            out.append(load_model_input(path, exif_transpose=args.exif_transpose, max_side=args.max_side)[0])
        except InputError as err:
            out.append(err)
    return out


class _ChunkSet(torch.utils.data.Dataset):
    """Chunk k -> the decoded model inputs (or InputErrors) of its images, for DataLoader workers."""

    def __init__(self, chunks: Sequence[Sequence[int]], paths: Sequence[Path], args):
        self.chunks, self.paths, self.args = chunks, paths, args

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int) -> list:
        return _load_chunk([self.paths[i] for i in self.chunks[k]], self.args)


def _as_is(item):
    return item


def _loaded_chunks(chunks: Sequence[Sequence[int]], paths: Sequence[Path], args):
    """Decoded chunks in order: ``--workers N`` DataLoader processes, or with 0 workers one
    background thread that decodes the next chunk during the model's work. (Batches are
    pinned where they are stacked, by the Tagger's schedule: pinning single images here
    would be undone by the stack.)"""
    if getattr(args, "workers", 0) > 0:
        yield from torch.utils.data.DataLoader(_ChunkSet(chunks, paths, args), batch_size=None,
                                               num_workers=args.workers, collate_fn=_as_is)
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_load_chunk, [paths[i] for i in chunks[0]], args) if chunks else None
        for k in range(len(chunks)):
            loaded = pending.result()
            if k + 1 < len(chunks):
                pending = pool.submit(_load_chunk, [paths[i] for i in chunks[k + 1]], args)
            yield loaded


def score_images(tagger: Tagger, ids: Sequence[str], paths: Sequence[Path], args,
                 journal: Optional[ScoreJournal] = None) -> tuple[torch.Tensor, list[int], list[InputError]]:
    """(n, N) scores (NaN rows for failed images), the indices of failed images and their errors.

    Images run in chunks of ``--batch_size`` consecutive images, the same chunks in every run.
    Rows already in ``journal`` are reused for chunks it holds completely; a chunk it holds in
    part is run again whole, so every batch has the composition of an uninterrupted run and a
    resumed run writes the same bytes (the crops of a batch share forwards, whose rounding
    depends on the batch). New rows are appended as each chunk finishes. Decoding of the next
    chunk overlaps the model's work on the current one.
    """
    scores = torch.full((len(paths), len(tagger.class_names)), float("nan"))
    done = journal.load() if journal else {}
    stamps = [file_stamp(p) for p in paths] if journal else []
    step = args.batch_size
    all_chunks = [list(range(s, min(s + step, len(paths)))) for s in range(0, len(paths), step)]
    finished = {i for i, image_id in enumerate(ids) if image_id in done and done[image_id][0] == stamps[i]}
    chunks, kept = [], {}
    for chunk in all_chunks:
        if finished.issuperset(chunk):
            for i in chunk:
                kept[ids[i]] = done[ids[i]]
                scores[i] = torch.from_numpy(done[ids[i]][1])
        else:
            chunks.append(chunk)
    if journal:
        journal.start(kept)
    failed: list[int] = []
    failures: list[InputError] = []
    todo = [i for chunk in chunks for i in chunk]
    try:
        with tqdm(total=len(paths), initial=len(paths) - len(todo), unit="img", desc="classify",
                  file=sys.stderr) as bar:
            for idx, loaded in zip(chunks, _loaded_chunks(chunks, paths, args)):
                good = []
                for i, item in zip(idx, loaded):
                    if isinstance(item, InputError):
                        if args.on_error == "stop":
                            raise item
                        failed.append(i)
                        failures.append(item)
                    else:
                        good.append((i, item))
                if good:
                    rows = tagger.scores([t for _, t in good])
                    scores[[i for i, _ in good]] = rows
                    if journal:
                        journal.append([ids[i] for i, _ in good], [stamps[i] for i, _ in good], rows.numpy())
                bar.update(len(idx))
    except KeyboardInterrupt:
        if journal is None:
            raise
        raise Interrupted(f"{len(journal.load())} of {len(paths)} image(s) are scored and kept in {journal.path}; "
                          "the same command resumes from there") from None
    return scores, failed, failures


def run_classify(args) -> int:
    return distributed.sharded(_run_classify, args, args.device)


def _run_classify(args, shard: distributed.Shard) -> int:
    vocab = _Vocabulary(args)
    entries, paths, refused = _image_list(args, vocab)
    check_outputs(args.output_dir, args.scores_out, args.vis_dir)
    with folder_lock(args.output_dir, f"{vocab.label_file}{shard.tag}"):
        return _classify_locked(args, shard, vocab, entries, paths, refused)


def _classify_locked(args, shard: distributed.Shard, vocab: _Vocabulary, entries: Sequence[SplitEntry],
                     paths: Sequence[Path], refused: Sequence[InputError]) -> int:
    """The run, with the output folder locked against another run writing the same files."""
    device = shard.device
    precision = args.precision
    if shard.is_main:
        print(RULE)
        print("num_classes_dataset:", len(vocab.names))
        print("num_classes_all:", len(vocab.names) + len(vocab.background))
        print("num_images:", len(entries))
        print("device:", device if shard.world == 1 else f"{device} x {shard.world} processes")
        print(RULE + "\n")
    model = load_model(args.model_path, device, precision, args.model_cache, args.allow_checkpoint_code)
    tagger = Tagger(model, vocab.names, vocab.background,
                    params=vocab.dataset.params, label_threshold=vocab.dataset.label_rel_threshold,
                    use_text_cache=not args.no_text_cache, batch_size=args.batch_size)
    label_path = Path(args.output_dir) / vocab.label_file
    journal = ScoreJournal(label_path.with_name(f".{label_path.name}{shard.tag}.journal"), run_key(
        checkpoint=model.checkpoint_sha256, names=vocab.names, background=vocab.background,
        params=vocab.dataset.params, exif=args.exif_transpose, max_side=args.max_side,
        device=device.type, precision=precision, batch=args.batch_size,
        split=args.split_file and str(Path(args.split_file).resolve()), root=str(Path(args.img_root).resolve())),
        len(vocab.names))
    mine = distributed.owned_indices(len(entries), max(1, args.batch_size), shard)
    part, failed, failures = score_images(tagger, [entries[i].id for i in mine], [paths[i] for i in mine],
                                          args, journal)
    gathered = distributed.gather((mine, part, [mine[i] for i in failed], [str(e) for e in failures]), shard)
    if not shard.is_main:
        if not failures:
            journal.remove()
        return 0
    scores = torch.full((len(entries), len(vocab.names)), float("nan"))
    failed_set, messages = set(), [str(e) for e in refused]
    for idx, rows, bad, errs in gathered:
        scores[idx] = rows
        failed_set.update(bad)
        messages.extend(errs)
    ok = [i for i in range(len(entries)) if i not in failed_set]
    ok_entries = [entries[i] for i in ok]
    ok_scores = scores[ok]

    if any(e.labels for e in entries) and len(ok_entries):
        onehot = labels_to_onehot(ok_entries, len(vocab.names))
        f1, p, r = f1_overall(ok_scores, onehot, vocab.dataset.label_rel_threshold)
        print(format_metrics(mean_average_precision(ok_scores, onehot), f1, p, r), end="")

    print(f">>>writing to {label_path}")
    lines = label_file_lines([e.id for e in ok_entries], ok_scores, vocab.dataset.label_rel_threshold)
    write_text_atomic(label_path, "".join(line + "\n" for line in lines))
    if args.scores_out:
        write_scores(args.scores_out, [e.id for e in ok_entries], vocab.names, ok_scores)
        print(f">>>scores written to {args.scores_out}")
    if getattr(args, "vis_dir", None):
        write_pictures(args.vis_dir, ok_entries, [paths[i] for i in ok], vocab.names, ok_scores, lines)
    if messages:  # the journals stay: a rerun only retries the failed images
        return report_failures(messages)
    if not failures:
        journal.remove()  # outputs are complete; a rerun starts afresh
    return 0


def write_pictures(vis_dir, entries: Sequence[SplitEntry], paths: Sequence[Path], names: Sequence[str],
                   scores: torch.Tensor, lines: Sequence[str]) -> None:
    """``--vis_dir``: each image with its label-file tags and scores; the per-class AP chart
    when the entries carry labels (classes without a positive image shown as missing)."""
    from . import vis  # deferred: matplotlib only when pictures are asked for

    rows = scores.detach().cpu().numpy()
    for entry, path, line, row in tqdm(list(zip(entries, paths, lines, rows)), unit="img", desc="pictures",
                                       file=sys.stderr):
        tags = [(names[int(c)], float(row[int(c)])) for c in line.split()[1:]]
        vis.draw_tags(path, tags, Path(vis_dir) / f"{entry.id}.png")
    if any(e.labels for e in entries) and len(entries):
        from .metrics import average_precision

        onehot = labels_to_onehot(entries, len(names))
        ap = average_precision(scores, onehot).tolist()
        has_pos = onehot.bool().any(dim=0).tolist()
        values = [v if pos else float("nan") for v, pos in zip(ap, has_pos)]
        vis.bar_chart(names, values, f"AP per class ({len(entries)} images; n/a: no positive image)",
                      Path(vis_dir) / "ap_per_class.png", xlabel="average precision")
    print(f">>>pictures written to {vis_dir}")


def check_outputs(folder=None, scores_out=None, vis_dir=None) -> None:
    """Every output location of a run checked before the model loads: one InputError line
    naming the first that cannot be written (a file in the way, read-only, a bad extension)."""
    if folder is not None:
        writable_dir(folder)
    if scores_out:
        check_scores_path(scores_out)
    if vis_dir:
        writable_dir(vis_dir, "picture folder")


def load_model(model_path: str, device, precision: str, cache_dir=None, allow_code: bool = False):
    """The commands' one way to load a model: the device checked first, then the checkpoint
    (read as data unless ``allow_code``, ``--allow_checkpoint_code``); every problem is an
    InputError (one line, exit status 2)."""
    import clip  # deferred: torch/open_clip import cost only when a model is needed

    device = clip.resolve_device(device)
    if os.environ.get(CACHE_ENV):  # a cache the user chose must work; the default one is optional
        writable_dir(os.environ[CACHE_ENV], f"cache folder ({CACHE_ENV})")
    return clip.load(model_path, device=device, dtype=clip.precision_dtype(precision), cache_dir=cache_dir,
                     allow_code=allow_code)


def add_checkpoint_code_argument(p: argparse.ArgumentParser) -> None:
    """``--allow_checkpoint_code``, on every command that loads a model."""
    p.add_argument("--allow_checkpoint_code", action="store_true",
                   help="load a TorchScript checkpoint with TorchScript itself, which RUNS CODE stored in the file; "
                        "only for a file you trust (default: its tensors are read as data; OpenAI's releases and "
                        "state-dict files never need this)")


def report_failures(failures: Sequence) -> int:
    """List the images a ``--on_error skip`` run skipped; the exit status (1 if any, else 0)."""
    if not failures:
        return 0
    print(f"{len(failures)} image(s) failed and were skipped:", file=sys.stderr)
    for failure in failures:
        print(f"  {failure}", file=sys.stderr)
    return EXIT_SKIPPED_IMAGES


def guarded(run, args) -> int:
    """Run a command. Bad input (:class:`InputError`: unreadable or malformed files, bad
    arguments, checkpoint and device problems) becomes one ``error:`` line and exit status 2.
    Ctrl-C becomes one ``interrupted:`` line saying what was kept for resuming, status 130.
    Anything else is a bug: its traceback, one line saying so, and EXIT_INTERNAL_ERROR."""
    try:
        return run(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt as stop:
        kept = stop.kept if isinstance(stop, Interrupted) else "nothing of this run is kept"
        print(f"\ninterrupted: {kept}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:  # noqa: BLE001 - reported in full, never disguised as bad input
        traceback.print_exc()
        print(f"internal error: the traceback above is a bug in the toolkit, not a problem with your input; "
              f"please report it (exit status {EXIT_INTERNAL_ERROR})", file=sys.stderr)
        return EXIT_INTERNAL_ERROR


def classify_main(argv: Optional[Sequence[str]] = None) -> int:
    return guarded(run_classify, classify_parser().parse_args(argv))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``tagclip {classify,tag,segment,demo} ...``"""
    p = argparse.ArgumentParser(prog="tagclip", description="TagCLIP: open-vocabulary image tagging with CLIP")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("classify", help="classify.py: the paper's classification run", add_help=False)
    tag = sub.add_parser("tag", help="tag every image in a folder with your own class names")
    tag.add_argument("img_root", help="image folder")
    tag.add_argument("--dataset", default="voc2007", choices=list(DATASETS),
                     help="thresholds to use (and the vocabulary when --classes is not given)")
    add_run_arguments(tag)
    seg = sub.add_parser("segment", help="tags -> CAMs -> masks for every image in a folder, your class names")
    from .segment import add_segment_arguments, run_segment
    add_segment_arguments(seg)
    demo = sub.add_parser("demo", help="tag the bundled sample images with the VOC and COCO vocabularies")
    from .demo import add_demo_arguments, run_demo
    add_demo_arguments(demo)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["classify"]:
        return classify_main(argv[1:])
    args = p.parse_args(argv)
    if args.command == "tag":
        args.split_file, args.save_file = None, False
        return guarded(run_classify, args)
    if args.command == "segment":
        return guarded(run_segment, args)
    return guarded(run_demo, args)


if __name__ == "__main__":
    sys.exit(main())
