"""Import official StyleGAN2-ADA / StyleGAN3 network pickles as plain data, never importing or running their code."""
import collections
import io
import os
import pickle
import re
import warnings

import numpy as np
import torch

from networks.discriminator import Discriminator
from networks.generator import Generator
from training.errors import UserError
from training.io.files import load_strict


class UnsafePickleError(UserError, pickle.UnpicklingError):
    """Raised when a pickle asks for anything outside the short list of globals the official format needs."""
    pass


class UnsupportedNetworkError(UserError, ValueError):
    """Raised when the file is a valid official pickle but holds a network ganforge cannot represent."""
    pass


class OfficialFormatError(UserError, ValueError):
    """Raised when the file's structure is not the official persistence layout (missing keys, wrong types)."""
    pass


# torch dtypes a pickle may name as globals (`torch.float32` pickles as the global torch.float32).
_TORCH_DTYPES = {name: getattr(torch, name) for name in (
    'float16', 'float32', 'float64', 'bfloat16', 'uint8', 'int8', 'int16', 'int32', 'int64', 'bool',
    'half', 'float', 'double', 'short', 'int', 'long')}

# Numeric numpy dtype codes accepted in numpy scalars/arrays (no object, void, string or datetime kinds).
_NUMPY_DTYPE_RE = re.compile(r'^(b1|\?|[iu][1248]|f[248]|c(8|16))$')


# The plain record that replaces `torch_utils.persistence._reconstruct_persistent_obj(meta)`.
def _persistent_record(meta):
    if not isinstance(meta, dict):
        raise OfficialFormatError(f'persistent object meta must be a dict, got {type(meta).__name__}')
    missing = [k for k in ('type', 'version', 'module_src', 'class_name', 'state') if k not in meta]
    if missing:
        raise OfficialFormatError(f'persistent object meta lacks keys {missing} (has {sorted(meta)})')
    if meta['type'] != 'class' or not isinstance(meta['class_name'], str) or not isinstance(meta['state'], dict):
        raise OfficialFormatError(f"persistent object meta has type={meta['type']!r}, "
                                  f"class_name={meta['class_name']!r}; expected type 'class' and a dict state")
    src = meta['module_src']
    if not isinstance(src, str):
        raise OfficialFormatError(f'persistent object module_src must be text, got {type(src).__name__}')
    # module_src is kept as opaque text: it is only ever searched for marker strings, never compiled.
    return {'__persistent__': True, 'class_name': meta['class_name'], 'module_name': _module_name_from_src(src),
            'version': meta['version'], 'module_src': src, 'state': meta['state']}


# A descriptive module name guessed from the source text (the official code names it by an md5 of the text).
def _module_name_from_src(src):
    if 'Alias-Free Generative Adversarial Networks' in src or 'class SynthesisInput' in src:
        return 'training.networks_stylegan3'
    if 'networks_stylegan2' in src or 'fused_modconv_default' in src:
        return 'training.networks_stylegan2'
    return 'training.networks'


# Replacement for `torch.storage._load_from_bytes`: torch's own restricted loader on the inner legacy save.
def _load_storage_from_bytes(data):
    if not isinstance(data, (bytes, bytearray)):
        raise OfficialFormatError(f'storage payload must be bytes, got {type(data).__name__}')
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            storage = torch.load(io.BytesIO(bytes(data)), weights_only=True, map_location='cpu')
    except pickle.UnpicklingError as e:
        raise UnsafePickleError(f'storage payload refused by torch.load(weights_only=True): {e}') from None
    except Exception as e:
        raise OfficialFormatError(f'storage payload is not a torch storage save: {type(e).__name__}: {e}') from None
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise OfficialFormatError(f'storage payload decoded to {type(storage).__name__}, expected a torch storage')
    return storage


# Check that `hooks` is empty (hooks are never serialised by torch; a non-empty value is not plain data).
def _check_no_hooks(hooks, what):
    if hooks is not None and not (isinstance(hooks, dict) and len(hooks) == 0):
        raise UnsafePickleError(f'{what} carries backward hooks {hooks!r}; expected an empty OrderedDict')


# Replacement for `torch._utils._rebuild_tensor_v2`: a tensor view of a decoded storage, bounds-checked.
def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise OfficialFormatError(f'tensor storage must be a torch storage, got {type(storage).__name__}')
    _check_no_hooks(backward_hooks, 'tensor')
    ints = [offset, *size, *stride]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints) or len(size) != len(stride):
        raise OfficialFormatError(f'tensor geometry offset={offset!r} size={size!r} stride={stride!r} is invalid')
    if isinstance(storage, torch.TypedStorage):
        dtype, untyped = storage.dtype, storage._untyped_storage
    else:
        dtype, untyped = torch.uint8, storage
    numel_needed = offset + 1 + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else 0
    if numel_needed * dtype.itemsize > untyped.nbytes():
        raise OfficialFormatError(f'tensor of size {tuple(size)} at offset {offset} overruns its storage '
                                  f'({untyped.nbytes()} bytes)')
    return torch.empty((0,), dtype=dtype).set_(untyped, offset, tuple(size), tuple(stride))


# Replacement for `torch._utils._rebuild_parameter`: parameters become plain tensors.
def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, torch.Tensor):
        raise OfficialFormatError(f'parameter data must be a tensor, got {type(data).__name__}')
    _check_no_hooks(backward_hooks, 'parameter')
    if state:
        raise OfficialFormatError(f'parameter carries extra state {sorted(state)!r}; expected none')
    return data


# Replacement for `torch.Size`: a size made only of non-negative ints.
def _torch_size(dims=()):
    dims = tuple(dims)
    if not all(isinstance(d, int) and d >= 0 for d in dims):
        raise OfficialFormatError(f'torch.Size must hold non-negative ints, got {dims!r}')
    return torch.Size(dims)


# Stand-in for `dnnlib.util.EasyDict` (a dict subclass): becomes a plain dict after loading.
class _PlainDict(dict):
    pass


# Stand-in for `numpy.dtype(spec, align, copy)`; its byte order arrives through BUILD (__setstate__).
class _NumpyDtype:
    def __init__(self, spec, align=False, copy=False):
        if not isinstance(spec, str) or not _NUMPY_DTYPE_RE.match(spec):
            raise UnsafePickleError(f'numpy dtype {spec!r} is not allowed; only numeric dtypes are')
        self.spec, self.byteorder = spec, '='

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) < 2 or any(v is not None for v in state[2:5]):
            raise UnsafePickleError(f'numpy dtype state {state!r} is not a plain numeric dtype')
        if state[1] not in ('<', '>', '|', '='):
            raise OfficialFormatError(f'numpy dtype byte order {state[1]!r} is invalid')
        self.byteorder = state[1]

    def get(self):
        dtype = np.dtype(self.spec)
        return dtype.newbyteorder(self.byteorder) if self.byteorder in '<>' else dtype


# Replacement for `numpy.core.multiarray.scalar(dtype, bytes)`: decoded with np.frombuffer, as a Python number.
def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, _NumpyDtype) or not isinstance(data, bytes):
        raise UnsafePickleError(f'numpy scalar of ({type(dtype).__name__}, {type(data).__name__}) is not allowed')
    dt = dtype.get()
    if len(data) != dt.itemsize:
        raise OfficialFormatError(f'numpy scalar of dtype {dt} has {len(data)} bytes, expected {dt.itemsize}')
    return np.frombuffer(data, dtype=dt)[0].item()


# Marker standing for the global `numpy.ndarray` (only accepted as `_reconstruct`'s first argument).
class _NdarrayMarker:
    pass


# Stand-in for `numpy.core.multiarray._reconstruct(ndarray, shape, dtype)`; finished after loading.
class _NumpyArray:
    def __init__(self, cls=None, shape=(0,), code=b'b'):
        if cls is not _NdarrayMarker:
            raise UnsafePickleError(f'numpy _reconstruct of {cls!r} is not allowed; only numpy.ndarray is')
        self.array = None

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) != 5:
            raise OfficialFormatError(f'numpy array state must be a 5-tuple, got {type(state).__name__}')
        _, shape, dtype, fortran, raw = state
        if not isinstance(dtype, _NumpyDtype) or not isinstance(raw, bytes):
            raise UnsafePickleError('numpy array with a non-numeric dtype or non-bytes data is not allowed')
        dt = dtype.get()
        count = int(np.prod(shape)) if len(shape) else 1
        if count * dt.itemsize != len(raw):
            raise OfficialFormatError(f'numpy array of shape {shape} holds {len(raw)} bytes, expected '
                                      f'{count * dt.itemsize}')
        self.array = np.frombuffer(raw, dtype=dt).reshape(shape, order='F' if fortran else 'C').copy()


# The complete allow-list: (module, name) -> harmless replacement. Nothing else is ever resolved.
_ALLOWED = {
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _persistent_record,
    ('torch.storage', '_load_from_bytes'): _load_storage_from_bytes,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('torch', 'Size'): _torch_size,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('dnnlib.util', 'EasyDict'): _PlainDict,
    ('dnnlib', 'EasyDict'): _PlainDict,
    ('numpy', 'dtype'): _NumpyDtype,
    ('numpy', 'ndarray'): _NdarrayMarker,
    ('numpy.core.multiarray', 'scalar'): _numpy_scalar,
    ('numpy._core.multiarray', 'scalar'): _numpy_scalar,
    ('numpy.core.multiarray', '_reconstruct'): _NumpyArray,
    ('numpy._core.multiarray', '_reconstruct'): _NumpyArray,
    **{('torch', name): dtype for name, dtype in _TORCH_DTYPES.items()},
}


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler whose find_class only looks names up in _ALLOWED: it never imports a module."""
    def __init__(self, file, source='<bytes>'):
        super().__init__(file)
        self.source = source

    def find_class(self, module, name):
        target = _ALLOWED.get((module, name))
        if target is None:
            raise UnsafePickleError(f'{self.source}: refusing to load global {module}.{name}: it is not one of the '
                                    f'{len(_ALLOWED)} tensor/record constructors an official network pickle needs')
        return target

    def persistent_load(self, pid):
        raise UnsafePickleError(f'{self.source}: refusing persistent id {pid!r}: official network pickles use none')


# Replace loader stand-ins (EasyDict, numpy arrays/dtypes) by plain dicts/arrays, recursively.
def _finish(obj, seen=None):
    seen = {} if seen is None else seen
    if id(obj) in seen:
        return seen[id(obj)]
    if isinstance(obj, _NumpyArray):
        if obj.array is None:
            raise OfficialFormatError('numpy array was never given its data')
        out = obj.array
    elif isinstance(obj, _NumpyDtype):
        out = obj.get()
    elif isinstance(obj, dict):
        out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
        seen[id(obj)] = out
        for k, v in obj.items():
            out[_finish(k, seen)] = _finish(v, seen)
    elif isinstance(obj, list):
        out = []
        seen[id(obj)] = out
        out.extend(_finish(v, seen) for v in obj)
    elif isinstance(obj, tuple) and not isinstance(obj, torch.Size):
        out = tuple(_finish(v, seen) for v in obj)
    elif isinstance(obj, (set, frozenset)):
        out = type(obj)(_finish(v, seen) for v in obj)
    else:
        out = obj
    seen[id(obj)] = out
    return out


def safe_loads(data, source='<bytes>'):
    """Unpickle bytes with the restricted unpickler and return plain data (dicts, lists, tensors, records)."""
    return _safe_unpickle(io.BytesIO(data), source)


# Unpickle an open binary file with the restricted unpickler; errors name `source`.
def _safe_unpickle(file, source):
    try:
        return _finish(RestrictedUnpickler(file, source).load())
    except OfficialFormatError as e:
        raise OfficialFormatError(f'{source}: {e}') from None
    except UnsafePickleError as e:
        raise UnsafePickleError(str(e) if str(e).startswith(source) else f'{source}: {e}') from None
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError, KeyError) as e:
        raise OfficialFormatError(f'{source}: not a valid network pickle ({type(e).__name__}: {e})') from None


def safe_load(path):
    """Read a file with the restricted unpickler."""
    with open(path, 'rb') as f:
        return _safe_unpickle(f, os.fspath(path))


# The kwargs a persisted object was constructed with; positional args are named by the official signatures.
_POSITIONAL = {'Generator': ('z_dim', 'c_dim', 'w_dim', 'img_resolution', 'img_channels'),
               'Discriminator': ('c_dim', 'img_resolution', 'img_channels')}


# A record's constructor kwargs, with positional `_init_args` named by the official signature.
def _init_kwargs(record, where):
    state = record['state']
    args, kwargs = state.get('_init_args', ()), state.get('_init_kwargs', {})
    if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict):
        raise OfficialFormatError(f'{where}: _init_args/_init_kwargs must be a tuple and a dict')
    names = _POSITIONAL.get(record['class_name'], ())
    if len(args) > len(names):
        raise OfficialFormatError(f'{where}: {record["class_name"]} has {len(args)} positional constructor args, '
                                  f'expected at most {len(names)}')
    return {**dict(zip(names, args)), **kwargs}


# Flatten a persisted module tree into a torch-style state dict (params, persistent buffers, then children);
# the names of parameters (as opposed to buffers) are added to `params` when given.
def _flatten(record, where, prefix='', out=None, params=None):
    out = collections.OrderedDict() if out is None else out
    if not (isinstance(record, dict) and record.get('__persistent__')):
        raise OfficialFormatError(f'{where}: module {prefix.rstrip(".") or "<root>"} is not a persistent object')
    state = record['state']
    for key in ('_parameters', '_buffers', '_modules'):
        if not isinstance(state.get(key), dict):
            raise OfficialFormatError(f'{where}: module {prefix.rstrip(".") or "<root>"} ({record["class_name"]}) '
                                      f'has no {key} dict; expected a torch.nn.Module __dict__')
    skip = state.get('_non_persistent_buffers_set') or set()
    tensors = list(state['_parameters'].items()) + [(k, v) for k, v in state['_buffers'].items() if k not in skip]
    for name, value in tensors:
        if value is None:
            continue
        if type(value) is not torch.Tensor:
            raise OfficialFormatError(f'{where}: {prefix}{name} is a {type(value).__name__}, expected a tensor')
        out[prefix + name] = value.detach()
        if params is not None and name in state['_parameters']:
            params.append(prefix + name)
    for name, child in state['_modules'].items():
        if child is not None:
            _flatten(child, where, f'{prefix}{name}.', out, params)
    return out


# Refuse generators whose synthesis network is not StyleGAN2's block structure (StyleGAN3 T/R, anything else).
def _check_supported(record, where):
    if 'stylegan3' in record['module_name']:
        raise UnsupportedNetworkError(f'{where}: {record["class_name"]} comes from {record["module_name"]} '
                                      f'(StyleGAN3); only StyleGAN2 networks are supported')
    if record['class_name'] != 'Generator':
        return
    synthesis = record['state'].get('_modules', {}).get('synthesis')
    if not isinstance(synthesis, dict) or not synthesis.get('__persistent__'):
        raise OfficialFormatError(f'{where}: Generator has no persisted synthesis network')
    children = list(synthesis['state'].get('_modules', {}))
    if 'stylegan3' in synthesis['module_name'] or 'b4' not in children:
        raise UnsupportedNetworkError(
            f'{where}: synthesis network {synthesis["class_name"]} (module {synthesis["module_name"]}, layers '
            f'{children[:4]}...) is not a StyleGAN2 synthesis network (no b4 block; StyleGAN3 T/R synthesis?); '
            f'only StyleGAN2 synthesis is supported')


def load_official_pkl(path):
    """Load an official network pickle as {'G','D','G_ema': {class_name, module_name, init_kwargs, state_dict,
    param_names} | None, 'training_set_kwargs': dict | None}; never imports or runs anything from the file."""
    path = os.fspath(path)
    data = safe_load(path)
    if not isinstance(data, dict):
        raise OfficialFormatError(f'{path}: top level is a {type(data).__name__}, expected a dict with G, D, G_ema')
    if not any(isinstance(data.get(k), dict) for k in ('G', 'D', 'G_ema')):
        raise OfficialFormatError(f'{path}: no G, D or G_ema network found (keys: {sorted(map(str, data))})')
    out = {'training_set_kwargs': data.get('training_set_kwargs')}
    for key in ('G', 'D', 'G_ema'):
        record = data.get(key)
        if record is None:
            out[key] = None
            continue
        where = f'{path} [{key}]'
        if not (isinstance(record, dict) and record.get('__persistent__')):
            raise OfficialFormatError(f'{where}: expected a persistent network object, got {type(record).__name__}')
        _check_supported(record, where)
        params = []
        state_dict = _flatten(record, where, params=params)
        out[key] = {'class_name': record['class_name'], 'module_name': record['module_name'],
                    'init_kwargs': _init_kwargs(record, where), 'state_dict': state_dict, 'param_names': params}
    return out


# Official keys that are no constructor argument of ganforge's networks: memory layouts, fp16 kernels, and D's
# training-time Freeze-D count (freeze_layers; build_networks keeps it in the imported config as 'freeze_d').
_IGNORED = {'fp16_channels_last', 'channels_last', 'fused_modconv_default', 'freeze_layers'}
# Official constructor keys ganforge's G and D accept under the same name and meaning.
_G_TOP = ('z_dim', 'c_dim', 'w_dim', 'img_resolution', 'img_channels')
_G_MAPPING = {'num_layers', 'embed_features', 'layer_features', 'activation', 'lr_multiplier', 'w_avg_beta'}
_G_SYNTHESIS = {'channel_base', 'channel_max', 'num_fp16_res', 'architecture', 'resample_filter', 'conv_clamp',
                'use_noise', 'activation', 'kernel_size'}
_D_TOP = ('c_dim', 'img_resolution', 'img_channels')
_D_MAIN = {'architecture', 'channel_base', 'channel_max', 'num_fp16_res', 'conv_clamp', 'cmap_dim'}
_D_BLOCK = {'activation', 'resample_filter'}
_D_EPILOGUE = {'mbstd_group_size', 'mbstd_num_channels'}
# State-dict keys that differ between the official networks and ganforge's (none: the names match by design).
_RENAMES = {}


# Copy the allowed keys of `src` into a new dict; ignored keys are dropped, anything else is refused.
def _take(src, allowed, where):
    if not isinstance(src, dict):
        raise OfficialFormatError(f'{where} must be a dict, got {type(src).__name__}')
    out = {}
    for key, value in src.items():
        if key in allowed:
            out[key] = list(value) if isinstance(value, tuple) else value
        elif key not in _IGNORED:
            raise UnsupportedNetworkError(f'{where}: official option {key}={value!r} has no ganforge equivalent')
    return out


# Require the constructor arguments every network needs.
def _require(kwargs, names, where):
    missing = [n for n in names if n not in kwargs]
    if missing:
        raise OfficialFormatError(f'{where}: constructor kwargs lack {missing} (have {sorted(kwargs)})')
    return {n: kwargs[n] for n in names}


# Map an official Generator's kwargs onto ganforge's Generator(z_dim, c_dim, w_dim, img_resolution,
# img_channels, mapping_kwargs, synthesis_kwargs); official defaults are written out explicitly.
def _generator_config(kwargs, where):
    config = _require(kwargs, _G_TOP, where)
    # stylegan2-ada nests synthesis options in synthesis_kwargs; stylegan3's StyleGAN2 G takes them directly.
    flat = {k: v for k, v in kwargs.items() if k not in (*_G_TOP, 'mapping_kwargs', 'synthesis_kwargs')}
    synthesis = dict(channel_base=32768, channel_max=512, num_fp16_res=0, architecture='skip', conv_clamp=None)
    synthesis.update(_take(kwargs.get('synthesis_kwargs') or {}, _G_SYNTHESIS, f'{where} synthesis_kwargs'))
    synthesis.update(_take(flat, _G_SYNTHESIS, f'{where} kwargs'))
    mapping = dict(num_layers=8)
    mapping.update(_take(kwargs.get('mapping_kwargs') or {}, _G_MAPPING, f'{where} mapping_kwargs'))
    return dict(config, mapping_kwargs=mapping, synthesis_kwargs=synthesis)


# Map an official Discriminator's kwargs (block/mapping/epilogue_kwargs) onto ganforge's flat Discriminator.
def _discriminator_config(kwargs, where):
    config = _require(kwargs, _D_TOP, where)
    config.update(architecture='resnet', channel_base=32768, channel_max=512, num_fp16_res=0, conv_clamp=None,
                  cmap_dim=None, mbstd_group_size=4, mbstd_num_channels=1)
    rest = {k: v for k, v in kwargs.items() if k not in (*_D_TOP, 'block_kwargs', 'mapping_kwargs',
                                                         'epilogue_kwargs')}
    config.update(_take(rest, _D_MAIN, f'{where} kwargs'))
    epilogue = dict(kwargs.get('epilogue_kwargs') or {})
    if epilogue.pop('activation', 'lrelu') != 'lrelu':
        raise UnsupportedNetworkError(f'{where} epilogue_kwargs: only activation lrelu is supported')
    epilogue.pop('conv_clamp', None)  # The official D passes its own conv_clamp to the epilogue as well.
    config.update(_take(epilogue, _D_EPILOGUE, f'{where} epilogue_kwargs'))
    config['block_kwargs'] = _take(kwargs.get('block_kwargs') or {}, _D_BLOCK, f'{where} block_kwargs')
    config['mapping_kwargs'] = _take(kwargs.get('mapping_kwargs') or {}, _G_MAPPING - {'w_avg_beta'},
                                     f'{where} mapping_kwargs')
    return config


# NVIDIA's Freeze-D count (--freezed) from an official D's kwargs (block_kwargs.freeze_layers), or None.
def _freeze_layers(kwargs, where):
    value = (kwargs.get('block_kwargs') or {}).get('freeze_layers')
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise OfficialFormatError(f'{where} block_kwargs: freeze_layers={value!r} is not a non-negative integer')
    return value


def read_freeze_layers(path):
    """The Freeze-D count (NVIDIA's --freezed: D's block_kwargs.freeze_layers) an official pickle's D was trained
    with, or None when the file has no D or its D records none."""
    record = load_official_pkl(path)['D']
    return None if record is None else _freeze_layers(record['init_kwargs'], f'{os.fspath(path)} [D]')


def official_to_ganforge(record, where='network'):
    """One network record from load_official_pkl -> (kind 'G' | 'D', ganforge constructor kwargs, state dict, renamed
    keys {official: ganforge})."""
    if record['class_name'] == 'Generator':
        kind, config = 'G', _generator_config(record['init_kwargs'], where)
    elif record['class_name'] == 'Discriminator':
        kind, config = 'D', _discriminator_config(record['init_kwargs'], where)
    else:
        raise UnsupportedNetworkError(f'{where}: class {record["class_name"]} is not an official Generator or '
                                      f'Discriminator')
    renamed = {k: _RENAMES[k] for k in record['state_dict'] if k in _RENAMES}
    state_dict = collections.OrderedDict((_RENAMES.get(k, k), v) for k, v in record['state_dict'].items())
    return kind, config, state_dict, renamed


def build_networks(path, device='cpu'):
    """Build ganforge G, D and G_ema (eval mode, no grad, on `device`) from an official pickle.

    Returns load_snapshot's shape: {'G', 'D', 'G_ema': module | None, 'config': {source, G_kwargs, D_kwargs,
    renamed, training_set_kwargs, ...}, 'meta': {'<net>_kwargs': constructor kwargs}}. A state dict that does not
    fit the network its kwargs describe is an OfficialFormatError listing the keys. D's Freeze-D count
    (block_kwargs.freeze_layers) is a training option, not part of the network: it is kept as config['freeze_d']
    when the pickle records one (its frozen layers' weights, stored by NVIDIA as buffers, load like the others).
    """
    data = load_official_pkl(path)
    config = {'source': os.path.basename(os.fspath(path)), 'source_format': 'official StyleGAN2 network pickle',
              'training_set_kwargs': data['training_set_kwargs'], 'renamed': {}}
    out = {'config': config, 'meta': {}}
    for key in ('G', 'D', 'G_ema'):
        record = data[key]
        if record is None:
            out[key] = None
            continue
        where = f'{os.fspath(path)} [{key}]'
        kind, kwargs, state_dict, renamed = official_to_ganforge(record, where)
        net = (Generator if kind == 'G' else Discriminator)(**kwargs)
        out[key] = load_strict(net, state_dict, where, OfficialFormatError).eval().requires_grad_(False).to(device)
        config[f'{kind}_kwargs'] = out['meta'][f'{key}_kwargs'] = kwargs
        config['renamed'].update({f'{key}.{k}': v for k, v in renamed.items()})
        if kind == 'D' and (freeze := _freeze_layers(record['init_kwargs'], where)) is not None:
            config['freeze_d'] = freeze
    return out
