"""Tests for the safe importer of official StyleGAN2-ADA / StyleGAN3 network pickles (training/io/official.py)."""
import builtins
import collections
import json
import os
import pickle
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import official_builder as ob
from training.io import official
from training.io.official import OfficialFormatError, UnsafePickleError, UnsupportedNetworkError

# The shared official-format snapshot with reference outputs (kept outside the repository).
DATA = Path(__file__).resolve().parents[2] / 'shared/testdata/official-stylegan2-ada'
PKL = DATA / 'network-snapshot-000000.pkl'
needs_data = pytest.mark.skipif(not PKL.is_file(), reason=f'official test data not found at {DATA}')
# Largest absolute difference allowed against the official code's recorded outputs (float32, reference ops).
TOL = 1e-4


# A tiny official-layout Generator/Discriminator pair with nested modules, params, buffers and kwargs.
def _tiny_networks(module_src=ob.DEFAULT_SRC):
    g_sd = {'synthesis.b4.const': torch.randn(4, 4, 4), 'synthesis.b4.resample_filter': torch.rand(4, 4),
            'synthesis.b4.conv1.weight': torch.randn(4, 4, 3, 3), 'mapping.w_avg': torch.randn(8),
            'mapping.fc0.weight': torch.randn(8, 8), 'mapping.fc0.bias': torch.randn(8)}
    g_kwargs = ob.EasyDict(c_dim=0, w_dim=8, img_resolution=4, img_channels=3,
                           mapping_kwargs=ob.EasyDict(num_layers=1),
                           synthesis_kwargs=ob.EasyDict(channel_base=16, channel_max=4, conv_clamp=256))
    G = ob.module_tree(g_sd, {'': 'Generator', 'synthesis': 'SynthesisNetwork', 'synthesis.b4': 'SynthesisBlock',
                              'mapping': 'MappingNetwork'}, module_src=module_src)
    G.init_args, G.init_kwargs = (8,), g_kwargs  # z_dim passed positionally, as the official signature allows.
    G.attrs = {'act_gain': np.float64(np.sqrt(2)), 'num_ws': np.int64(2)}
    d_sd = {'b4.fc.weight': torch.randn(4, 64), 'b4.out.bias': torch.randn(1)}
    D = ob.module_tree(d_sd, {'': 'Discriminator'}, {'': dict(c_dim=0, img_resolution=4, img_channels=3,
                                                            epilogue_kwargs=ob.EasyDict(mbstd_group_size=2))})
    return G, D, g_sd, d_sd


# The (module, name) globals a pickle resolves, recorded through the restricted unpickler itself.
def _globals_used(data):
    seen = set()

    class Recorder(official.RestrictedUnpickler):
        def find_class(self, module, name):
            seen.add((module, name))
            return super().find_class(module, name)

    import io
    Recorder(io.BytesIO(data)).load()
    return seen


# Malicious reductions that would each create `marker` if run: (fn, args) for ob.GlobalRefCall.
def _payloads(marker):
    return {'os.system': (os.system, (f'touch {marker}',)),
            'builtins.exec': (builtins.exec, (f'open({str(marker)!r}, "w").close()',)),
            'builtins.eval': (builtins.eval, (f'open({str(marker)!r}, "w").close()',)),
            'subprocess.call': (subprocess.call, (['touch', str(marker)],))}


# The builder's file loads back with identical tensors (order kept), kwargs, numpy scalars and EasyDicts.
def test_builder_file_loads_with_expected_tensors_and_kwargs(tmp_path):
    G, D, g_sd, d_sd = _tiny_networks()
    path = tmp_path / 'tiny.pkl'
    ob.write_pkl(path, {'G': G, 'D': D, 'G_ema': None, 'augment_pipe': None,
                        'training_set_kwargs': ob.EasyDict(resolution=4, xflip=np.bool_(True),
                                                           mean=np.arange(3, dtype=np.float32))})
    data = official.load_official_pkl(path)
    assert data['G_ema'] is None
    assert data['G']['class_name'] == 'Generator' and data['D']['class_name'] == 'Discriminator'
    assert list(data['G']['state_dict']) == ['synthesis.b4.const', 'synthesis.b4.resample_filter',
                                             'synthesis.b4.conv1.weight', 'mapping.w_avg', 'mapping.fc0.weight',
                                             'mapping.fc0.bias']
    for got, want in ((data['G']['state_dict'], g_sd), (data['D']['state_dict'], d_sd)):
        assert set(got) == set(want)
        for k, v in want.items():
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    assert data['G']['param_names'] == ['synthesis.b4.const', 'synthesis.b4.conv1.weight', 'mapping.fc0.weight',
                                        'mapping.fc0.bias']
    kw = data['G']['init_kwargs']
    assert kw['z_dim'] == 8 and kw['w_dim'] == 8 and type(kw['mapping_kwargs']) is dict
    assert kw['synthesis_kwargs'] == {'channel_base': 16, 'channel_max': 4, 'conv_clamp': 256}
    assert data['D']['init_kwargs']['epilogue_kwargs'] == {'mbstd_group_size': 2}
    tsk = data['training_set_kwargs']
    assert type(tsk) is dict and tsk['xflip'] is True and np.array_equal(tsk['mean'], [0, 1, 2])
    raw = official.safe_load(path)['G']
    assert raw['state']['act_gain'] == pytest.approx(np.sqrt(2)) and raw['state']['num_ws'] == 2
    assert raw['module_src'] == ob.DEFAULT_SRC and raw['version'] == 6


# A `module_src` that would create a marker file if executed or compiled loads fine and creates nothing.
def test_module_src_is_never_executed(tmp_path):
    marker = tmp_path / 'pwned'
    src = f'import os\nos.system("touch {marker}")\nopen({str(marker)!r}, "w").write("x")\nclass Generator: pass\n'
    G, D, _, _ = _tiny_networks(module_src=src)
    path = tmp_path / 'src.pkl'
    ob.write_pkl(path, {'G': G, 'D': D})
    data = official.load_official_pkl(path)
    assert data['G']['state_dict']['mapping.fc0.weight'].shape == (8, 8)
    assert official.safe_load(path)['G']['module_src'] == src
    assert not marker.exists()


# The payloads are real: plain pickle would run them (so the refusal test below cannot pass vacuously).
def test_malicious_payload_runs_under_plain_pickle(tmp_path):
    marker = tmp_path / 'plain'
    pickle.loads(pickle.dumps(ob.GlobalRefCall(*_payloads(marker)['os.system'])))
    assert marker.exists()


# A pickle reducing to os.system / exec / eval / subprocess (even deep inside a network) is refused, unrun.
@pytest.mark.parametrize('protocol', [0, 4])
@pytest.mark.parametrize('kind', ['os.system', 'builtins.exec', 'builtins.eval', 'subprocess.call'])
def test_code_running_pickle_is_refused_and_not_run(tmp_path, kind, protocol):
    marker = tmp_path / 'pwned'
    G, D, _, _ = _tiny_networks()
    G.init_kwargs['synthesis_kwargs']['evil'] = ob.GlobalRefCall(*_payloads(marker)[kind])
    path = tmp_path / 'evil.pkl'
    path.write_bytes(ob.dumps({'G': G, 'D': D}) if protocol == 4 else pickle.dumps(
        {'G': ob.GlobalRefCall(*_payloads(marker)[kind])}, protocol=0, fix_imports=False))
    with pytest.raises(UnsafePickleError) as err:
        official.load_official_pkl(path)
    fn = _payloads(marker)[kind][0]
    assert f'{fn.__module__}.{fn.__name__}' in str(err.value) and str(path) in str(err.value)
    assert not marker.exists()


# A tensor storage whose inner torch.save payload carries code is refused by torch's weights_only loader.
def test_malicious_storage_payload_is_refused(tmp_path):
    marker = tmp_path / 'pwned'
    inner = pickle.dumps(ob.GlobalRefCall(*_payloads(marker)['os.system']), protocol=2)
    path = tmp_path / 'storage.pkl'
    path.write_bytes(ob.dumps({'G': ob.GlobalRefCall(ob.GlobalRef('torch.storage', '_load_from_bytes'),
                                                     (inner,))}))
    with pytest.raises(UnsafePickleError, match='weights_only'):
        official.safe_load(path)
    assert not marker.exists()


# Object-dtype numpy arrays (whose elements could be anything) are refused before their elements load.
def test_numpy_object_array_is_refused(tmp_path):
    marker = tmp_path / 'pwned'
    arr = np.array([ob.GlobalRefCall(*_payloads(marker)['os.system'])], dtype=object)
    with pytest.raises(UnsafePickleError, match='numpy dtype'):
        official.safe_loads(ob.dumps({'G': arr}), 'mem.pkl')
    assert not marker.exists()


# A tensor claiming more elements than its storage holds is rejected instead of reading out of bounds.
def test_tensor_overrunning_its_storage_is_rejected():
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        storage = torch.arange(4, dtype=torch.float32).storage()
    rebuild = ob.GlobalRef('torch._utils', '_rebuild_tensor_v2')
    ok = ob.dumps(ob.GlobalRefCall(rebuild, (storage, 1, (3,), (1,), False, collections.OrderedDict())))
    assert torch.equal(official.safe_loads(ok), torch.tensor([1.0, 2.0, 3.0]))
    bad = ob.dumps(ob.GlobalRefCall(rebuild, (storage, 2, (3,), (1,), False, collections.OrderedDict())))
    with pytest.raises(OfficialFormatError, match='overruns its storage'):
        official.safe_loads(bad, 'mem.pkl')


# Any global outside the allow-list is refused, even a harmless-looking torch function.
def test_unlisted_global_is_refused():
    data = ob.dumps(ob.GlobalRefCall(ob.GlobalRef('torch', 'load'), ('x.pt',)))
    with pytest.raises(UnsafePickleError, match=r'torch\.load'):
        official.safe_loads(data, 'mem.pkl')


# A StyleGAN3 synthesis network (by its module source or by lacking StyleGAN2's b4) gives a clear error.
@pytest.mark.parametrize('src', ['"""Generator architecture from the paper\n"Alias-Free Generative Adversarial '
                                 'Networks"."""\n', ob.DEFAULT_SRC])
def test_stylegan3_synthesis_is_unsupported(tmp_path, src):
    sd = {'synthesis.input.weight': torch.randn(4, 2), 'synthesis.L0_36_64.weight': torch.randn(4, 4, 3, 3),
          'mapping.fc0.weight': torch.randn(4, 4)}
    G = ob.module_tree(sd, {'': 'Generator', 'synthesis': 'SynthesisNetwork'}, module_src=src)
    G.init_kwargs = dict(z_dim=4, c_dim=0, w_dim=4, img_resolution=16, img_channels=3)
    path = tmp_path / 'sg3.pkl'
    ob.write_pkl(path, {'G': G, 'D': None, 'G_ema': G})
    with pytest.raises(UnsupportedNetworkError) as err:
        official.load_official_pkl(path)
    msg = str(err.value)
    assert 'only StyleGAN2' in msg and 'StyleGAN3' in msg and str(path) in msg and '[G]' in msg


# Official options without a ganforge equivalent are refused by name; training-only ones are dropped.
def test_unknown_option_is_reported_and_training_options_dropped():
    record = {'class_name': 'Generator', 'state_dict': {}, 'init_kwargs': dict(
        z_dim=4, c_dim=0, w_dim=4, img_resolution=8, img_channels=3, mapping_kwargs={'num_layers': 2},
        synthesis_kwargs={'fp16_channels_last': True, 'channel_base': 64})}
    kind, config, _, renamed = official.official_to_ganforge(record)
    assert kind == 'G' and renamed == {} and config['synthesis_kwargs']['channel_base'] == 64
    assert 'fp16_channels_last' not in config['synthesis_kwargs']
    record['init_kwargs']['synthesis_kwargs']['magnitude_ema_beta'] = 0.9
    with pytest.raises(UnsupportedNetworkError, match='magnitude_ema_beta=0.9'):
        official.official_to_ganforge(record)


# The real shared snapshot: every official G/D key is present, parameter counts match, shapes fit ganforge.
@needs_data
def test_real_snapshot_keys_shapes_and_parameter_counts(real):
    cfg = json.loads((DATA / 'config.json').read_text())
    data = real['data']
    for net in ('G', 'D'):
        sd = data[net]['state_dict']
        assert list(sd) == cfg[f'{net}_state_dict_keys']
        assert sum(sd[k].numel() for k in data[net]['param_names']) == cfg[f'{net}_params']
        built = real['nets'][net].state_dict()
        assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in built.items()}
    assert list(data['G_ema']['state_dict']) == cfg['G_state_dict_keys']
    assert data['G']['state_dict']['synthesis.b4.const'].shape == (64, 4, 4)
    assert data['G']['init_kwargs']['mapping_kwargs'] == {'num_layers': cfg['map_layers']}
    assert real['nets']['config']['renamed'] == {}
    assert real['nets']['G_ema'].num_ws == cfg['num_ws']


# The builder writes the same globals as the official file and reproduces its tensors exactly.
@needs_data
def test_builder_matches_official_layout(real, tmp_path):
    data = real['data']
    G = ob.module_tree(data['G']['state_dict'], {'': 'Generator'}, {'': dict(data['G']['init_kwargs'])})
    path = tmp_path / 'rebuilt.pkl'
    ob.write_pkl(path, {'G': G})
    assert _globals_used(path.read_bytes()) - {('dnnlib.util', 'EasyDict')} <= _globals_used(PKL.read_bytes())
    again = official.load_official_pkl(path)['G']
    assert again['init_kwargs'] == data['G']['init_kwargs']
    assert all(torch.equal(again['state_dict'][k], v) for k, v in data['G']['state_dict'].items())


# A state dict that does not fit ganforge's network is reported with the missing key.
@needs_data
def test_mismatched_state_dict_is_reported(real, tmp_path):
    sd = dict(real['data']['G']['state_dict'])
    del sd['synthesis.b8.conv0.bias']
    G = ob.module_tree(sd, {'': 'Generator'}, {'': dict(real['data']['G']['init_kwargs'])})
    path = tmp_path / 'partial.pkl'
    ob.write_pkl(path, {'G': G})
    with pytest.raises(OfficialFormatError, match=r'synthesis\.b8\.conv0\.bias'):
        official.build_networks(path)


# Output parity with the official networks' stored outputs (mapping, truncation, synthesis, D) within 1e-4.
@needs_data
@pytest.mark.parametrize('output', ['ws', 'ws_trunc', 'img', 'img_trunc', 'd_logits'])
def test_parity_with_reference_outputs(real, output):
    ref = np.load(DATA / 'reference.npz')
    G, D = real['nets']['G_ema'], real['nets']['D']
    z, c = torch.from_numpy(ref['z']), torch.from_numpy(ref['c']).float()
    with torch.no_grad():
        if output == 'ws':
            got = G.mapping(z, c)
        elif output == 'ws_trunc':
            got = G.mapping(z, c, truncation_psi=float(ref['psi']))
        elif output in ('img', 'img_trunc'):
            got = G.synthesis(torch.from_numpy(ref['ws' if output == 'img' else 'ws_trunc']), noise_mode='const')
        else:
            got = D(torch.from_numpy(ref['img']), c)
    want = ref[output]
    assert got.shape == want.shape
    assert np.abs(got.numpy() - want).max() <= TOL
    if output == 'ws':  # The projector-layout files hold the same ws, one sample each.
        for i in range(len(want)):
            assert np.abs(np.load(DATA / f'w{i}.npz')['w'][0] - got[i].numpy()).max() <= TOL


# The CLI converts to a ganforge snapshot that loads back to the same images; refused input exits 2, no output.
@needs_data
def test_convert_script_roundtrip(tmp_path, capsys):
    from scripts.convert_official import main
    from training.io.checkpoint import load_snapshot
    out = tmp_path / 'network-snapshot-000000.safetensors'
    assert main([str(PKL), str(out)]) == 0
    assert 'renamed keys: none' in capsys.readouterr().out
    snap = load_snapshot(out)
    ref = np.load(DATA / 'reference.npz')
    with torch.no_grad():
        img = snap['G_ema'].synthesis(torch.from_numpy(ref['ws']), noise_mode='const')
        logits = snap['D'](torch.from_numpy(ref['img']), torch.from_numpy(ref['c']).float())
    assert np.abs(img.numpy() - ref['img']).max() <= TOL and np.abs(logits.numpy() - ref['d_logits']).max() <= TOL
    assert snap['config']['renamed'] == {} and snap['G'] is not None
    evil, bad_out = tmp_path / 'evil.pkl', tmp_path / 'bad.safetensors'
    evil.write_bytes(pickle.dumps(ob.GlobalRefCall(*_payloads(tmp_path / 'pwned')['os.system'])))
    assert main([str(evil), str(bad_out)]) == 2
    assert 'posix.system' in capsys.readouterr().err and not bad_out.exists()
    assert not (tmp_path / 'pwned').exists()


# The real snapshot, loaded once per module: raw records and built ganforge networks.
@pytest.fixture(scope='module')
def real():
    if not PKL.is_file():
        pytest.skip(f'official test data not found at {DATA}')
    return {'data': official.load_official_pkl(PKL), 'nets': official.build_networks(PKL)}
