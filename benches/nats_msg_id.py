"""nats-server's CPU per JetStream message with and without a Nats-Msg-Id header.

Messages shaped like eddy's event messages in cluster mode: subject eddy.ev.<p> over 64
partitions, an Eddy-Now header, and an NDJSON payload of E events, published to a stream
EDDY_EVENTS (file storage, duplicate window DW seconds, default 60 as eddy's) of a fresh
nats-server with JetStream on 127.0.0.1, at about 80,000 messages/s (no ack asked: acks are
the same in both variants). For each variant, ROUNDS times alternated: the server's utime +
stime from /proc over the N messages, divided by the messages the stream holds at the end.

    EDDY_NATS_SERVER=/path/to/nats-server N=200000 E=3 ROUNDS=3 python3 benches/nats_msg_id.py
"""
import socket, json, subprocess, time, tempfile, shutil, os
NS=os.environ['EDDY_NATS_SERVER']
N=int(os.environ.get('N','200000')); E=int(os.environ.get('E','3')); ROUNDS=int(os.environ.get('ROUNDS','3'))
def cpu(pid):
    f=open(f'/proc/{pid}/stat').read().rsplit(')',1)[1].split()
    return (int(f[11])+int(f[12]))/os.sysconf('SC_CLK_TCK')
def run(with_id):
    d=tempfile.mkdtemp()
    s=socket.socket(); s.bind(('127.0.0.1',0)); port=s.getsockname()[1]; s.close()
    p=subprocess.Popen([NS,'-js','-a','127.0.0.1','-p',str(port),'-sd',d],stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL)
    time.sleep(1)
    c=socket.create_connection(('127.0.0.1',port)); f=c.makefile('rb'); f.readline()
    c.sendall(b'CONNECT {"headers":true,"verbose":false,"protocol":1}\r\nSUB _R 1\r\n')
    cfg={"name":"EDDY_EVENTS","subjects":["eddy.ev.*"],"duplicate_window":int(os.environ.get("DW","60"))*1_000_000_000,"storage":"file","num_replicas":1}
    b=json.dumps(cfg).encode(); c.sendall(f'PUB $JS.API.STREAM.CREATE.EDDY_EVENTS _R {len(b)}\r\n'.encode()+b+b'\r\n')
    line=f.readline(); f.read(int(line.split()[-1])+2)
    ev=b'{"symbol":"S17","price":123.5,"size":7,"venue":"V3","ts":1700000000000}\n'
    payload=ev*E
    before=cpu(p.pid); wall=time.time()
    buf=[]
    for i in range(N):
        hdr=b'NATS/1.0\r\nEddy-Now: 1764540000000\r\n'
        if with_id: hdr+=b'Nats-Msg-Id: a.1764540000000.%d\r\n' % i
        hdr+=b'\r\n'
        buf.append(b'HPUB eddy.ev.%d %d %d\r\n' % (i%64, len(hdr), len(hdr)+len(payload)) + hdr + payload + b'\r\n')
        if len(buf)==500:
            c.sendall(b''.join(buf)); buf=[]
            # Nothing is asked back; read whatever the server sends (pings) so it never waits.
            c.setblocking(False)
            try:
                while c.recv(1<<20): pass
            except BlockingIOError: pass
            c.setblocking(True)
            time.sleep(0.006)
    c.sendall(b''.join(buf)+b'PING\r\n')
    # wait until all stored
    c.setblocking(True)
    deadline=time.time()+30
    while time.time()<deadline:
        b=b'{}'; c2=socket.create_connection(('127.0.0.1',port)); f2=c2.makefile('rb'); f2.readline()
        c2.sendall(b'CONNECT {"verbose":false}\r\nSUB _Q 1\r\nPUB $JS.API.STREAM.INFO.EDDY_EVENTS _Q 2\r\n{}\r\n')
        while True:
            l=f2.readline()
            if l.startswith(b'MSG'): info=json.loads(f2.read(int(l.split()[-1])+2)); break
        c2.close()
        if info['state']['messages']>=N: break
        time.sleep(0.2)
    used=cpu(p.pid)-before; el=time.time()-wall
    p.terminate(); p.wait(); shutil.rmtree(d, ignore_errors=True)
    return used, info['state']['messages'], el
res={True:[],False:[]}
for r in range(ROUNDS):
    for w in (False,True):
        used,n,el=run(w); res[w].append(used/n*1e6)
        print(f"round {r} ids={w}: {n} msgs, nats-server {used:.2f} s CPU, {used/n*1e6:.2f} us/msg, {el:.1f} s wall", flush=True)
for w in (False,True):
    v=sorted(res[w]); print(f"ids={w}: median {v[len(v)//2]:.2f} us per message ({v})")
