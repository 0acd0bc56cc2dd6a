"""Hub export, offline loading from a fake Hub cache, and model cards."""
import json
import shutil

import torch
import timm
import yaml

from timm_srn.hub import export_for_hub, model_card, write_hub_cards

COMMIT = 'a' * 40


def _fake_hub_cache(cache, repo_id, folder):
    """The huggingface_hub cache layout: models--ORG--NAME/{refs/main, snapshots/<commit>/files}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / 'snapshots' / COMMIT
    snapshot.mkdir(parents=True)
    for f in folder.iterdir():
        shutil.copy(f, snapshot / f.name)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(COMMIT)


def _front_matter(text):
    assert text.startswith('---\n')
    return yaml.safe_load(text.split('---\n')[1])


def test_export_then_load_offline_by_hf_hub_and_registered_name(tmp_path):
    model = timm.create_model('srn_resnet50', num_classes=80, img_size=224).eval()
    metrics = {'mAP': 71.234, 'CF1': 60.0, 'OF1': 65.5}
    folder = export_for_hub(model, tmp_path / 'export', 'timm-srn/srn_resnet50.coco_224', metrics=metrics, dataset='coco',
                            train_command='python train_scripts/train.py --model srn_resnet50')
    assert {p.name for p in folder.iterdir()} == {'model.safetensors', 'config.json', 'README.md'}
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == 'srn_resnet50' and config['num_classes'] == 80
    assert config['model_args']['backbone'] == 'resnet50' and len(config['label_names']) == 80
    cache = tmp_path / 'cache'
    _fake_hub_cache(cache, 'timm-srn/srn_resnet50.coco_224', folder)
    x = torch.randn(1, 3, 224, 224)
    expected = model(x)
    by_hub = timm.create_model('hf-hub:timm-srn/srn_resnet50.coco_224', pretrained=True, cache_dir=cache).eval()
    by_name = timm.create_model('srn_resnet50.coco_224', pretrained=True, cache_dir=cache).eval()
    torch.testing.assert_close(by_hub(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(by_name(x), expected, rtol=0, atol=0)
    front = _front_matter((folder / 'README.md').read_text())
    assert front['library_name'] == 'timm'
    assert {'image-classification', 'multi-label-image-classification', 'timm', 'srn'} <= set(front['tags'])
    values = {m['type']: m['value'] for m in front['model-index'][0]['results'][0]['metrics']}
    assert values == {'mAP': 71.23, 'CF1': 60.0, 'OF1': 65.5}
    readme = (folder / 'README.md').read_text()
    assert 'import timm_srn' in readme and '--model srn_resnet50' in readme and 'arXiv:1702.05891' in readme


def test_card_without_results_reports_no_numbers():
    card = model_card('timm-srn/x', 'srn_resnet101', 'resnet101', 80, 45_000_000, 224, 'coco')
    assert 'model-index' not in _front_matter(card)
    assert 'have not been trained and evaluated yet' in card


def test_hub_cards_regenerated_from_results(tmp_path):
    results = tmp_path / 'results'
    results.mkdir()
    (results / 'srn_resnet101.coco_224.json').write_text(json.dumps(
        {'metrics': {'mAP': 77.1}, 'settings': {'dataset': 'coco'}}))
    written = write_hub_cards(tmp_path, results)
    assert set(written) == {t for t in timm.list_pretrained('srn*') if 'coco' in t}
    assert _front_matter(written['srn_resnet101.coco_224'].read_text())['model-index'][0]['results'][0]['metrics'][0]['value'] == 77.1
    assert 'model-index' not in _front_matter(written['srn_resnet50.coco_224'].read_text())


def test_checked_in_cards_are_current(tmp_path):
    from pathlib import Path
    repo_cards = Path(__file__).resolve().parents[1] / 'hub_cards'
    written = write_hub_cards(tmp_path, repo_cards / 'results')
    for tag, path in written.items():
        assert (repo_cards / f'{tag}.md').read_text() == path.read_text(), f'regenerate hub_cards ({tag})'


def test_publish_uploads_the_folder_without_printing_the_token(tmp_path, monkeypatch, capsys):
    """The upload path with huggingface_hub's HfApi replaced by a recorder (no network here)."""
    import huggingface_hub
    from timm_srn.hub import publish_folder
    calls = []

    class RecordingApi:
        def __init__(self, **kwargs):
            calls.append(('init', kwargs))

        def create_repo(self, repo_id, private, exist_ok):
            calls.append(('create_repo', repo_id, private, exist_ok))
            return type('RepoUrl', (), {'repo_id': repo_id})()

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls.append(('upload_folder', repo_id, folder_path))

    monkeypatch.setattr(huggingface_hub, 'HfApi', RecordingApi)
    monkeypatch.setenv('HF_TOKEN', 'hf_secret_token_value')
    folder = export_for_hub(timm.create_model('srn_test_resnet', num_classes=3), tmp_path / 'out', 'me/srn')
    assert publish_folder(folder, 'me/srn', private=True) == 'me/srn'
    assert calls[1] == ('create_repo', 'me/srn', True, True)
    assert calls[2] == ('upload_folder', 'me/srn', str(folder))
    assert 'hf_secret_token_value' not in capsys.readouterr().out + repr(calls)


def test_card_of_a_plain_timm_model(tmp_path):
    model = timm.create_model('test_resnet', num_classes=4)
    folder = export_for_hub(model, tmp_path / 'plain', 'me/resnet-sp', metrics={'mAP': 50.0}, dataset='voc2012',
                            train_command='python train_scripts/train.py --model resnet50 --loss spatial')
    card = (folder / 'README.md').read_text()
    front = _front_matter(card)
    assert 'srn' not in front['tags'] and front['datasets'] == ['voc2012']
    assert 'A timm `test_resnet`' in card and 'Spatial Regularization Network (SRN' not in card
    assert card.index('import timm_srn') < card.index('import timm\n')
