"""Test helper: write pickles in the official StyleGAN persistence layout without the official code."""
import collections
import io
import os
import pickle
import tempfile

import torch

# Placeholder module source stored in each persisted object (the importer must never execute it).
DEFAULT_SRC = '# Network source text omitted from this test file.\n'


# A global the pickle will name (module, name) without that module having to exist here.
class GlobalRef:
    def __init__(self, module, name):
        self.module, self.name = module, name
        self.__name__ = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f'{self.module}.{self.name} is a stand-in; it only exists inside pickles')


# The globals the official format uses that are not importable in this process.
RECONSTRUCT = GlobalRef('torch_utils.persistence', '_reconstruct_persistent_obj')
EASYDICT = GlobalRef('dnnlib.util', 'EasyDict')


# An object pickled as the call `ref(*args)` (to write arbitrary reductions, e.g. hostile ones, in tests).
class GlobalRefCall:
    def __init__(self, ref, args):
        self.ref, self.args = ref, tuple(args)

    def __reduce__(self):
        return (self.ref, self.args)


# Stand-in for dnnlib.EasyDict: pickled as NEWOBJ of dnnlib.util.EasyDict followed by its items.
class EasyDict(dict):
    pass


# Stand-in for a persistent torch.nn.Module: reduced to _reconstruct_persistent_obj(meta) like the official one.
class PersistentModule:
    def __init__(self, class_name, *, params=None, buffers=None, modules=None, init_kwargs=None, init_args=(),
                 attrs=None, module_src=DEFAULT_SRC, version=6):
        self.class_name, self.module_src, self.version = class_name, module_src, version
        self.params = collections.OrderedDict(params or {})
        self.buffers = collections.OrderedDict(buffers or {})
        self.modules = collections.OrderedDict(modules or {})
        self.init_args, self.init_kwargs, self.attrs = tuple(init_args), dict(init_kwargs or {}), dict(attrs or {})

    # The module's __dict__ as torch.nn.Module has it (hook dicts empty, parameters as nn.Parameter).
    def state(self):
        empty = collections.OrderedDict
        state = {'training': False,
                 '_parameters': {k: torch.nn.Parameter(v, requires_grad=False) for k, v in self.params.items()},
                 '_buffers': dict(self.buffers), '_non_persistent_buffers_set': set(),
                 '_backward_pre_hooks': empty(), '_backward_hooks': empty(), '_is_full_backward_hook': None,
                 '_forward_hooks': empty(), '_forward_pre_hooks': empty(), '_state_dict_hooks': empty(),
                 '_load_state_dict_pre_hooks': empty(), '_modules': dict(self.modules),
                 '_init_args': self.init_args, '_init_kwargs': self.init_kwargs}
        state.update(self.attrs)
        return state

    def __reduce__(self):
        meta = dict(type='class', version=self.version, module_src=self.module_src, class_name=self.class_name,
                    state=self.state())
        return (RECONSTRUCT, (meta,))


# A pure-Python pickler that writes GlobalRef and EasyDict stand-ins under their official global names.
class OfficialPickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)

    def save_global_ref(self, obj):
        self.save(obj.module)
        self.save(obj.name)
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)

    def save_easydict(self, obj):
        self.save(EASYDICT)
        self.save(())
        self.write(pickle.NEWOBJ)
        self.memoize(obj)
        self._batch_setitems(iter(obj.items()))

    dispatch[GlobalRef] = save_global_ref
    dispatch[EasyDict] = save_easydict


# Pickle `obj` (protocol 4, as the official code does) into bytes.
def dumps(obj):
    buf = io.BytesIO()
    OfficialPickler(buf, protocol=4).dump(obj)
    return buf.getvalue()


# Write `obj` atomically to `path`.
def write_pkl(path, obj):
    data = dumps(obj)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix='.tmp')
    with os.fdopen(fd, 'wb') as f:
        f.write(data)
    os.replace(tmp, path)


# Nest a flat state dict into PersistentModules; `class_names` maps a module path ('' = root) to its class,
# `kwargs` maps a module path to its init kwargs; names in `buffer_names` (leaf names) become buffers.
def module_tree(state_dict, class_names, kwargs=None, buffer_names=('resample_filter', 'noise_const', 'w_avg'),
                module_src=DEFAULT_SRC):
    kwargs = kwargs or {}
    nodes = {}

    def node(path):
        if path not in nodes:
            nodes[path] = PersistentModule(class_names.get(path, 'Module'), init_kwargs=kwargs.get(path),
                                           module_src=module_src)
            if path:
                parent, _, leaf = path.rpartition('.')
                node(parent).modules[leaf] = nodes[path]
        return nodes[path]

    for name, tensor in state_dict.items():
        path, _, leaf = name.rpartition('.')
        target = node(path)
        (target.buffers if leaf in buffer_names else target.params)[leaf] = tensor.detach().clone()
    return node('')
