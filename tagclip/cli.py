"""Command line of the classification stage: ``classify.py`` (the paper's flags and more) and ``tagclip tag``.

Every flag that changes numbers defaults to the paper's setting. Bad input ends the run with
one ``error: <file>: <problem>`` line and exit status 2; with ``--on_error skip`` unreadable
images are listed at the end and the exit status is 1.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm import tqdm

from clip.loading import load_model
from toolkit import sharding
from toolkit.cli import (
    HelpFormatter,
    add_max_side_argument,
    add_model_arguments,
    add_on_error_argument,
    add_vis_argument,
    add_workers_argument,
    check_outputs,
    guarded,
    layers_value,
    positive_int,
    report_failures,
    settle_precision,
)
from toolkit.errors import InputError
from toolkit.files import read_text, write_text_atomic
from toolkit.images import ReadOptions, iter_image_files
from toolkit.resume import ScoreJournal, folder_lock, run_key
from toolkit.splits import SplitEntry, image_path, read_split

from .classify import ScoreOptions, score_images
from .labels import check_scores_path, label_file_lines, label_file_name, labels_to_onehot, write_scores
from .method import TagCLIPParams
from .metrics import f1_overall, format_metrics, mean_average_precision
from .registry import DATASETS, get_dataset
from .tagger import DEFAULT_BATCH_SIZE, Tagger, check_vocabulary

RULE = "=" * 48
CUSTOM_LABEL_FILE = "custom_val_tagclip.txt"
# A --classes / --background value without a comma that ends in one of these is a file name.
WORD_LIST_SUFFIXES = (".txt", ".csv", ".lst", ".list")


def looks_like_a_file(value: str) -> bool:
    """Whether a ``--classes`` / ``--background`` value names a file: it has no comma and holds
    a path separator or ends in one of :data:`WORD_LIST_SUFFIXES`."""
    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return "," not in value and (any(sep in value for sep in separators)
                                 or value.lower().endswith(WORD_LIST_SUFFIXES))


def parse_word_list(value: Optional[str]) -> list[str]:
    """A file with one name per line, or a comma-separated list. A value that looks like a
    file (:func:`looks_like_a_file`) but is none is an error, never a class name."""
    if not value:
        return []
    path = Path(value)
    if path.is_file():
        words = [w.strip() for w in read_text(path, "word list").splitlines() if w.strip()]
        if not words:
            raise InputError(path, "word list is empty")
    elif looks_like_a_file(value):
        raise InputError(path, "no such word list file (a value with a '/' or a .txt suffix is read as a file; "
                               "give class names as a comma list, e.g. 'cat,dog')")
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


def add_tagging_arguments(p: argparse.ArgumentParser) -> None:
    """The model and image flags of every tagging command (``classify.py``, ``tagclip tag``,
    ``tagclip segment``)."""
    add_model_arguments(p)
    p.add_argument("--no_text_cache", action="store_true", help="do not read or write cached text features")
    p.add_argument("--batch_size", type=positive_int, default=DEFAULT_BATCH_SIZE,
                   help="images of equal size per forward pass (default %(default)s)")
    add_on_error_argument(p)
    add_max_side_argument(p)
    p.add_argument("--refine_layers", type=layers_value, default=None,
                   help="blocks whose maps refine the patch scores, e.g. 8,9,10 or 16-21 (default: the dataset's "
                        "blocks for 12-block models, 8-10 or for cocostuff 0-10, carried to other depths as the "
                        "README's 'Other CLIP models' says; the paper gives none for them)")


def method_params(params: TagCLIPParams, refine_layers: Optional[Sequence[int]], model) -> TagCLIPParams:
    """The dataset's constants for this model: ``--refine_layers`` (blocks of this model) when
    given, else the paper's blocks carried to the model's depth; a block the model does not
    have is an InputError."""
    depth = model.visual.transformer.layers
    if refine_layers:
        params = replace(params, refine_layers=tuple(refine_layers), layers_depth=depth)
    try:
        return params.for_depth(depth)
    except ValueError as err:
        raise InputError("--refine_layers", str(err)) from None


def add_run_arguments(p: argparse.ArgumentParser, split_file: bool = True) -> None:
    """Flags shared by ``classify.py`` and ``tagclip tag`` (``split_file``: the command may
    read a split file, whose order and labels the help texts then speak of)."""
    order = "split order" if split_file else "image order (sorted ids)"
    add_tagging_arguments(p)
    p.add_argument("--classes", default=None,
                   help="open vocabulary: a file with one class name per line, or 'cat,dog,sofa'")
    p.add_argument("--background", default=None,
                   help="background words for --classes (file or comma list; default: none)")
    p.add_argument("--output_dir", default="./output", help="where the label file goes (default ./output)")
    p.add_argument("--scores_out", default=None,
                   help=f"write the score matrix: .npy (float32, rows in {order}), "
                        ".csv (header of class names) or .json ({id: {class: score}})")
    p.add_argument("--exif_transpose", action="store_true",
                   help="honour EXIF orientation (off by default, as the reference and the dataset annotations)")
    add_workers_argument(p)
    add_vis_argument(p, "{id}.png (the image with its tags and scores)"
                     + (" and, with labels in the split file, ap_per_class.png" if split_file else ""))


def classify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="classify.py", formatter_class=HelpFormatter,
        description="TagCLIP multi-label classification of a split file's images (or of every image in "
                    "--img_root), with the paper's flags.")
    p.add_argument("--dataset", default="voc2007", choices=list(DATASETS),
                   help="vocabulary, thresholds and label ids of a paper dataset (default voc2007)")
    p.add_argument("--img_root", required=True, help="image folder ({img_root}/{id}.jpg)")
    p.add_argument("--split_file", default=None,
                   help="'id l1 l2 ...' per line; without it every image in --img_root is tagged")
    p.add_argument("--save_file", action="store_true",
                   help="accepted for compatibility: the label file is always written")
    add_run_arguments(p)
    p.set_defaults(quiet=True)  # the paper's script prints metrics, not every image's tags
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
        return entries, [image_path(root, e.id) for e in entries], []
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


def run_classify(args) -> int:
    return sharding.sharded(_run_classify, args, args.device)


def _run_classify(args, shard: sharding.Shard) -> int:
    settle_precision(args, shard.device, shard.is_main)  # before anything is keyed by it
    vocab = _Vocabulary(args)
    entries, paths, refused = _image_list(args, vocab)
    check_outputs(args.output_dir, vis_dir=args.vis_dir)
    if args.scores_out:
        check_scores_path(args.scores_out)
    with folder_lock(args.output_dir, f"{vocab.label_file}{shard.tag}"):
        return _classify_locked(args, shard, vocab, entries, paths, refused)


def _classify_locked(args, shard: sharding.Shard, vocab: _Vocabulary, entries: Sequence[SplitEntry],
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
    model = load_model(args.model_path, device, precision, args.model_cache, args.allow_checkpoint_code,
                       args.arch)
    tagger = Tagger(model, vocab.names, vocab.background,
                    params=method_params(vocab.dataset.params, args.refine_layers, model),
                    label_threshold=vocab.dataset.label_rel_threshold,
                    use_text_cache=not args.no_text_cache, batch_size=args.batch_size)
    label_path = Path(args.output_dir) / vocab.label_file
    journal = ScoreJournal(label_path.with_name(f".{label_path.name}{shard.tag}.journal"), run_key(
        checkpoint=model.checkpoint_sha256, arch=model.architecture.key(), names=vocab.names,
        background=vocab.background,
        params=tagger.params, exif=args.exif_transpose, max_side=args.max_side,
        device=device.type, precision=precision, batch=args.batch_size,
        split=args.split_file and str(Path(args.split_file).resolve()), root=str(Path(args.img_root).resolve())),
        len(vocab.names))
    mine = sharding.owned_indices(len(entries), max(1, args.batch_size), shard)
    options = ScoreOptions(args.batch_size, args.workers, args.on_error,
                           ReadOptions(args.exif_transpose, args.max_side))
    part, failed, failures = score_images(tagger, [entries[i].id for i in mine], [paths[i] for i in mine],
                                          options, journal)
    gathered = sharding.gather((mine, part, [mine[i] for i in failed], [str(e) for e in failures]), shard)
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
    if args.vis_dir:
        write_pictures(args.vis_dir, ok_entries, [paths[i] for i in ok], vocab.names, ok_scores, lines,
                       args.exif_transpose)
    if not args.quiet:
        print_tags(ok_entries, vocab.names, ok_scores, lines)
    outputs = [f"labels {label_path}"] + [f"{what} {where}" for what, where in
                                          (("scores", args.scores_out), ("pictures", args.vis_dir)) if where]
    print(f"tagged {len(ok_entries)} of {len(entries)} image(s) ({len(messages)} skipped): " + ", ".join(outputs))
    if messages:  # the journals stay: a rerun only retries the failed images
        return report_failures(messages)
    if not failures:
        journal.remove()  # outputs are complete; a rerun starts afresh
    return 0


def print_tags(entries: Sequence[SplitEntry], names: Sequence[str], scores: torch.Tensor,
               lines: Sequence[str]) -> None:
    """``tagclip tag``: each image's tags (the label file's classes), best first, with scores."""
    rows = scores.detach().cpu().numpy()
    for entry, line, row in zip(entries, lines, rows):
        tags = sorted((int(c) for c in line.split()[1:]), key=lambda c: -float(row[c]))
        print(f"{entry.id}: " + ", ".join(f"{names[c]} {row[c]:.3f}" for c in tags))


def write_pictures(vis_dir, entries: Sequence[SplitEntry], paths: Sequence[Path], names: Sequence[str],
                   scores: torch.Tensor, lines: Sequence[str], exif_transpose: bool = False) -> None:
    """``--vis_dir``: each image with its label-file tags and scores; the per-class AP chart
    when the entries carry labels (classes without a positive image shown as missing)."""
    from toolkit import vis  # deferred: matplotlib only when pictures are asked for

    rows = scores.detach().cpu().numpy()
    for entry, path, line, row in tqdm(list(zip(entries, paths, lines, rows)), unit="img", desc="pictures",
                                       file=sys.stderr):
        tags = [(names[int(c)], float(row[int(c)])) for c in line.split()[1:]]
        vis.draw_tags(path, tags, Path(vis_dir) / f"{entry.id}.png", exif_transpose=exif_transpose)
    if any(e.labels for e in entries) and len(entries):
        from .metrics import average_precision

        onehot = labels_to_onehot(entries, len(names))
        ap = average_precision(scores, onehot).tolist()
        has_pos = onehot.bool().any(dim=0).tolist()
        values = [v if pos else float("nan") for v, pos in zip(ap, has_pos)]
        vis.bar_chart(names, values, f"AP per class ({len(entries)} images; n/a: no positive image)",
                      Path(vis_dir) / "ap_per_class.png", xlabel="average precision")
    print(f">>>pictures written to {vis_dir}")


def classify_main(argv: Optional[Sequence[str]] = None) -> int:
    return guarded(run_classify, classify_parser().parse_args(argv))
