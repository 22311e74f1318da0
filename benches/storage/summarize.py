import sys, statistics, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    d = dict(kv.split('=') for kv in line.split())
    rows[(d['store'], d['rec'], d.get('rate','max'))].append(d)
keys = ['rec_s','mb_s','avg_group','p50_ms','p99_ms','alloc_per_rec','cold_open_s','cold_rec_s','cold_mb_s','warm_rec_s','warm_mb_s']
print('| store | rec B | rate | ' + ' | '.join(keys) + ' |')
print('|' + '---|' * (len(keys) + 3))
for (s, r, rate), ds in rows.items():
    med = [statistics.median(float(d[k]) for d in ds) for k in keys]
    print(f'| {s} | {r} | {rate} | ' + ' | '.join(f'{m:,.2f}' if m < 100 else f'{m:,.0f}' for m in med) + f' |  (n={len(ds)})')
