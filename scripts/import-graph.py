#!/usr/bin/env python3
"""The module import graph of idem-runtime/src (top-level modules, and engine's files), and its cycles."""
import re, os, sys, collections
base = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), '..', 'idem-runtime', 'src')
def modname(path):
    parts = path[:-3].split('/')
    if parts[-1] in ('mod', 'lib'): parts = parts[:-1]
    return parts
edges = collections.defaultdict(set)
for root, _, files in os.walk(base):
    for f in files:
        if not f.endswith('.rs'): continue
        path = os.path.relpath(os.path.join(root, f), base)
        parts = modname(path)
        top = parts[0] if parts else 'lib'
        node = top if top != 'engine' or len(parts) < 2 else 'engine::' + parts[1]
        if top == 'engine' and len(parts) == 1: node = 'engine'
        src = open(os.path.join(root, f)).read()
        src = re.sub(r'#\[cfg\(test\)\]\s*mod tests \{.*', '', src, flags=re.S)
        src = '\n'.join(l for l in src.split('\n') if not l.strip().startswith('//'))
        targets = set(re.findall(r'crate::([a-z_]+)', src))
        for group in re.findall(r'crate::\{([^}]*)\}', src):
            targets |= set(re.findall(r'(?:^|,)\s*([A-Za-z_]+)', group))
        roots = {'Error': 'error', 'StoreError': 'error', 'Idem': 'runtime', 'IntoDuration': 'config',
                 'IdemBuilder': 'config', 'IdemConfig': 'config', 'Outcome': 'outcome', 'observe': 'outcome',
                 'Codec': 'codec', 'RecordId': 'key', 'Fingerprint': 'key', 'IntoKey': 'key', 'KeyHash': 'key'}
        targets |= {roots[t] for t in re.findall(r'crate::([A-Z][A-Za-z]+|observe)\b', src) if t in roots}
        targets = {roots.get(t, t) for t in targets}
        if top == 'engine':
            for t in re.findall(r'super::([a-z_]+)', src):
                if t in ('acquire','call','decide','flight','lease','record','replay','spec','tx'):
                    targets.add('engine::' + t)
                elif len(parts) > 1:
                    targets.add('engine')
        for t in targets:
            if t in ('Error', 'Idem', 'metrics_', 'store_conformance_tests'): pass
            if t != top and t != node:
                edges[node].add(t)
for k in sorted(edges): print(f'{k:20} -> {", ".join(sorted(edges[k]))}')
idx, low, st, on, sccs, c = {}, {}, [], set(), [], [0]
def sc(v):
    idx[v] = low[v] = c[0]; c[0] += 1; st.append(v); on.add(v)
    for w in edges.get(v, ()):
        if w not in idx: sc(w); low[v] = min(low[v], low[w])
        elif w in on: low[v] = min(low[v], idx[w])
    if low[v] == idx[v]:
        comp = []
        while True:
            w = st.pop(); on.discard(w); comp.append(w)
            if w == v: break
        if len(comp) > 1: sccs.append(comp)
for v in list(edges):
    if v not in idx: sc(v)
print('cycles:', sccs or 'none')
sys.exit(1 if sccs else 0)
