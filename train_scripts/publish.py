#!/usr/bin/env python3
"""Export a trained checkpoint to a Hub-ready folder in timm's format, and optionally upload it.

Dry run (writes the folder only):
    python train_scripts/publish.py --checkpoint output/train/best.pth.tar --results validate.json --repo-id ORG/NAME
Upload (token from HF_TOKEN or huggingface-cli login): the same with --push
Model cards of every registered tag, hub_cards/ from hub_cards/results/*.json:
    python train_scripts/publish.py --regenerate-cards
"""
import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from timm_srn.checkpoint import create_model_from_checkpoint, load_checkpoint_file
from timm_srn.cli import ArgumentParser, HelpFormatter
from timm_srn.hub import export_for_hub, publish_folder, write_hub_cards


def main(argv: Optional[List[str]] = None) -> Optional[Path]:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument('--checkpoint', help='train.py checkpoint to export')
    p.add_argument('--use-ema', action='store_true', help='export the EMA weights')
    p.add_argument('--results', help="validate.py JSON: the card's metrics (none: the card says so)")
    p.add_argument('--repo-id', help='ORG/NAME on the Hub')
    p.add_argument('--out', default='hub_export', help='folder to write')
    mode = p.add_mutually_exclusive_group()
    mode.add_argument('--push', action='store_true', help='upload the folder to the Hub')
    mode.add_argument('--dry-run', action='store_true', help='write the folder only (the default without --push)')
    p.add_argument('--private', action='store_true', help='with --push: create the Hub repository as private')
    p.add_argument('--regenerate-cards', action='store_true', help='rewrite hub_cards/ for every registered tag')
    p.add_argument('--cards-dir', default='hub_cards', help='with --regenerate-cards: folder of the cards')
    args = p.parse_args(argv)
    if args.regenerate_cards:
        for tag, path in write_hub_cards(args.cards_dir).items():
            print(f'{tag}: {path}')
        return Path(args.cards_dir)
    if not args.checkpoint or not args.repo_id:
        p.error('--checkpoint and --repo-id are required (or --regenerate-cards)')
    state = load_checkpoint_file(args.checkpoint)
    model = create_model_from_checkpoint(args.checkpoint, use_ema=args.use_ema)
    results = json.loads(Path(args.results).read_text()) if args.results else {}
    train_args = state.get('args', {})
    folder = export_for_hub(model, args.out, args.repo_id, metrics=results.get('metrics'),
                            dataset=results.get('settings', {}).get('dataset', train_args.get('dataset')),
                            train_command=train_args.get('command'))
    print(f'wrote {folder}')
    if args.push:
        repo_id = publish_folder(folder, args.repo_id, private=args.private)
        print(f'uploaded to https://huggingface.co/{repo_id}')
    else:
        print('dry run: pass --push to upload')
    return folder


if __name__ == '__main__':
    sys.exit(0 if main() else 1)
