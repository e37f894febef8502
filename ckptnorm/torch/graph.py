"""Graph work for ``convert``: one torch.fx graph per module ("piece"), and what the graphs tell about a tensor.

A model is read piece by piece: each module whose forward ckptnorm may need to understand is traced on its own,
with every submodule it calls kept as a leaf, so the graph of a piece shows exactly the code of that one
``forward``.  Rules:

 1. Tracing is lazy and cached per module object; a piece that fails to trace (data-dependent control flow, ...) is
    recorded with the reason, and nothing is concluded about the tensors it handles.
 2. A module is *called* where a traced piece has a ``call_module`` node resolving to it.  A module held by a piece
    that failed to trace may be called there too, so its calls are complete only when every module holding it
    traced (``Pieces.untraced_parent``).  Assumed: code calls the modules it holds, not its children's children
    (``self.block.relu(x)`` from a forward that fails to trace would go unseen).
 3. A piece may be *rewritten* (its forward replaced by code generated from its graph, ``rewrite.py``) only
    when its graphs traced in training and in eval mode are the same code and its forward has no optional
    arguments (a default such as ``mask=None`` is a Proxy while tracing, so ``if mask is not None`` would be
    frozen into the graph).
 4. Aliases of a tensor are the tensor, its views, and what leaf modules hand back unchanged (Identity, Dropout);
    a value returned by a piece continues at that piece's call nodes in its callers (rule 2 decides whether all
    of them are known).

``in_place_writer`` and ``kept_by_consumers`` answer, from these rules, whether an op may modify a layer's output
in place after the layer (which breaks a strategy that keeps that output), and whether the layer's consumers keep
the output for their backward (what the original model pays for it, used to predict the saving).
"""
from __future__ import annotations

import inspect
import operator

from torch import fx, nn

from .graph_nodes import _arg_index, _in_place, _is_alias, _keeps_input, _returns_input, _target, bn_kind
from .modules import _BatchNormAct
from .rewrite import RewrittenForward

__all__ = ["Pieces", "bn_kind"]

def _is_leaf_type(mod) -> bool:
    """Modules never traced as pieces: BatchNorm kinds, ckptnorm layers, and torch.nn's own layers."""
    if bn_kind(mod) is not None or isinstance(mod, _BatchNormAct):
        return True
    if isinstance(mod, (nn.ModuleList, nn.ModuleDict)):
        return True
    return type(mod).__module__.startswith("torch.nn") and not isinstance(mod, nn.Sequential)


class _InPlaceProxy(fx.Proxy):
    """fx's Proxy has no in-place operators, so ``out += r`` would be recorded as ``out = out + r``: the graph would
    hide that the tensor is modified, and a rewritten forward would no longer modify it.  Record them as such."""

    def __iadd__(self, other):
        return self.tracer.create_proxy("call_function", operator.iadd, (self, other), {})

    def __isub__(self, other):
        return self.tracer.create_proxy("call_function", operator.isub, (self, other), {})

    def __imul__(self, other):
        return self.tracer.create_proxy("call_function", operator.imul, (self, other), {})

    def __itruediv__(self, other):
        return self.tracer.create_proxy("call_function", operator.itruediv, (self, other), {})


class _OneLevelTracer(fx.Tracer):
    """Traces one forward: every module it calls is a leaf; in-place operators are kept (``_InPlaceProxy``)."""

    def is_leaf_module(self, m, qualname):
        return True

    def proxy(self, node):
        return _InPlaceProxy(node, self)


class Piece:
    """One module's forward as an fx graph (``graph`` None and ``error`` set when tracing failed)."""

    def __init__(self, name, module):
        self.name, self.module = name, module
        self.graph, self.error = None, ""
        try:
            self.graph = _trace(module)
        except Exception as exc:  # noqa: BLE001 -- any tracing failure means: no conclusions from this piece
            first = str(exc).splitlines()[0] if str(exc) else ""
            self.error = f"{type(exc).__name__}: {first}"[:200]
        self._rewritable = None

    def submodule(self, target):
        return self.module.get_submodule(target)

    def qualname(self, target) -> str:
        return f"{self.name}.{target}" if self.name else target

    def rewritable(self) -> str:
        """"" when this piece may be rewritten (rule 3), else why not."""
        if self._rewritable is None:
            self._rewritable = self._check_rewritable()
        return self._rewritable

    def _check_rewritable(self) -> str:
        if self.graph is None:
            return f"its forward could not be traced ({self.error})"
        try:
            fwd = self.module.forward
            params = list(inspect.signature(getattr(fwd, "function", fwd)).parameters.values())
        except (TypeError, ValueError):
            params = []
        optional = [p.name for p in params if p.default is not inspect.Parameter.empty
                    or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if optional:
            return f"its forward has optional arguments ({', '.join(optional)})"
        codes = []
        for mode in (True, False):
            saved = {m: m.training for m in self.module.modules()}
            try:
                self.module.train(mode)
                codes.append(_trace(self.module).python_code("self").src)
            except Exception as exc:  # noqa: BLE001
                return f"its forward could not be traced in {'training' if mode else 'eval'} mode ({exc})"
            finally:
                for m, was in saved.items():
                    m.training = was
        if codes[0] != codes[1]:
            return "its forward differs between training and eval mode"
        return ""


def _trace(module) -> fx.Graph:
    # fx traces the class's forward: a forward replaced on the instance must be read from what replaced it
    instance_forward = vars(module).get("forward")
    if isinstance(instance_forward, RewrittenForward) and instance_forward.graph is not None:
        graph = fx.Graph()
        graph.output(graph.graph_copy(instance_forward.graph, {}))
        return graph
    if instance_forward is not None:
        raise TypeError("its forward is replaced on the instance, and fx would trace the class's forward instead")
    return _OneLevelTracer().trace(module)


class Pieces:
    """The pieces of one model, traced on demand, and where each module is called (rule 2)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.names = {}      # id(module) -> first qualified name
        self.parents = {}    # id(module) -> ids of modules holding it as a child
        for name, mod in model.named_modules(remove_duplicate=False):
            self.names.setdefault(id(mod), name)
            for child in mod._modules.values():
                if child is not None:
                    self.parents.setdefault(id(child), set()).add(id(mod))
        self.by_id = {id(m): m for _, m in model.named_modules(remove_duplicate=False)}
        self._pieces = {}
        self._calls = None

    def piece(self, module) -> Piece | None:
        """The piece of ``module`` (None for leaf types, which are never traced)."""
        if _is_leaf_type(module):
            return None
        key = id(module)
        if key not in self._pieces:
            self._pieces[key] = Piece(self.names.get(key, "?"), module)
        return self._pieces[key]

    def all_pieces(self):
        return [p for p in (self.piece(m) for m in self.by_id.values()) if p is not None]

    def calls(self, module) -> list:
        """[(piece, node)] for every traced call of ``module``."""
        if self._calls is None:
            self._calls = {}
            for p in self.all_pieces():
                if p.graph is None:
                    continue
                for n in p.graph.nodes:
                    if n.op == "call_module":
                        try:
                            target = p.submodule(n.target)
                        except AttributeError:
                            continue
                        self._calls.setdefault(id(target), []).append((p, n))
        return self._calls.get(id(module), [])

    def untraced_parent(self, module) -> str:
        """The name of a module holding ``module`` whose forward failed to trace ("" if none): its calls of
        ``module`` are unseen (rule 2)."""
        for key in self.parents.get(id(module), ()):
            p = self.piece(self.by_id[key])
            if p is not None and p.graph is None:
                return p.name or type(p.module).__name__
        return ""

    def untraced_above(self, module) -> list:
        """Pieces above ``module`` (at any depth) that failed to trace."""
        seen, todo, found = set(), list(self.parents.get(id(module), ())), []
        while todo:
            key = todo.pop()
            if key in seen:
                continue
            seen.add(key)
            p = self.piece(self.by_id[key])
            if p is not None and p.graph is None:
                found.append(p)
            todo.extend(self.parents.get(key, ()))
        return found

    # -- what happens to a tensor after it is produced (rule 4) ----------------------------------------------------
    def consumers(self, piece, node, depth=0):
        """Yield (piece, user, read) for every op ``user`` reading ``node`` or one of its aliases (``read``: the node
        it reads), following aliases through views, pass-through leaves and piece outputs.  Yields
        (piece, None, None) where the trail is lost."""
        if depth > 16:
            yield piece, None, None
            return
        for user in list(node.users):
            if user.op == "output":
                if user.args[0] is not node:  # returned inside a tuple/dict: not followed
                    yield piece, None, None
                    continue
                if piece.module is self.model:
                    continue  # the model's own output: the caller's business
                if self.untraced_parent(piece.module):
                    yield piece, None, None
                for caller, call in self.calls(piece.module):
                    yield from self.consumers(caller, call, depth + 1)
                continue
            yield piece, user, node
            if _is_alias(piece, user, node):
                yield from self.consumers(piece, user, depth + 1)
            elif user.op == "call_module":
                child = self.piece(_target(piece, user))
                if child is not None and child.graph is not None and _returns_input(child.graph, user, node):
                    yield from self.consumers(piece, user, depth + 1)

    def in_place_writer(self, piece, node, exempt=None) -> str:
        """Why an op may write ``node``'s value in place after it is produced ("" when none can).  ``exempt``: a
        node allowed to (the activation fused into the layer)."""
        for p, user, read in self.consumers(piece, node):
            if user is None:
                return f"its output reaches code that was not traced ({p.name or 'the model'})"
            if user is exempt:
                continue
            what = _in_place(p, user)
            if what:
                return f"{what} modifies its output in place"
            if user.op == "call_module":
                child = self.piece(_target(p, user))
                if child is not None:
                    if child.graph is None:
                        return f"its output is passed to {p.qualname(user.target)}, which could not be traced"
                    idx = _arg_index(user, read)
                    ph = [n for n in child.graph.nodes if n.op == "placeholder"]
                    if idx is None or idx >= len(ph):
                        return f"its output is passed to {p.qualname(user.target)} in a way not followed"
                    inner = self.in_place_writer(child, ph[idx])
                    if inner:
                        return inner
        return ""

    def kept_by_consumers(self, piece, node) -> bool:
        """Whether some op reading ``node`` (or an alias) keeps it for its backward (unknown ops: assumed to)."""
        for p, user, read in self.consumers(piece, node):
            if user is None:
                return True
            child = self.piece(_target(p, user)) if user.op == "call_module" else None
            if child is not None:  # a traced piece: what its own ops keep of that argument
                idx = _arg_index(user, read)
                ph = [n for n in child.graph.nodes if n.op == "placeholder"] if child.graph is not None else []
                if idx is None or idx >= len(ph) or self.kept_by_consumers(child, ph[idx]):
                    return True
            elif _keeps_input(p, user):
                return True
        return False
