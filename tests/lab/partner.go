package lab

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Arrival is one datagram (or request) of a stream as the partner saw it.
type Arrival struct {
	Seq int       `json:"seq"`
	Src string    `json:"src"`
	At  time.Time `json:"at"`
}

// streams records numbered datagrams and requests by stream id, so that a test can
// tell which source address each one arrived with.
type streams struct {
	mu sync.Mutex
	m  map[string][]Arrival
}

func (s *streams) add(id string, seq int, src string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.m == nil {
		s.m = map[string][]Arrival{}
	}
	s.m[id] = append(s.m[id], Arrival{Seq: seq, Src: src, At: time.Now()})
}

func (s *streams) get(id string) []Arrival {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Arrival(nil), s.m[id]...)
}

// ServePartner is the external partner: HTTP `GET /` answers with the source address
// it saw, and every UDP datagram is echoed back prefixed with that address. Datagrams
// "stream ID SEQ" and requests "GET /?stream=ID&seq=SEQ" are also recorded, and
// `GET /stream?id=ID` returns what arrived, with source and time. It serves TCP and
// UDP on every address of listen (one family each: "0.0.0.0:8080", "[::]:8080").
func ServePartner(ctx context.Context, listen []string, log io.Writer) error {
	if len(listen) == 0 {
		return fmt.Errorf("the partner needs an address to listen on")
	}
	var lns []net.Listener
	var pcs []net.PacketConn
	for _, addr := range listen {
		host, _, err := net.SplitHostPort(addr)
		if err != nil {
			return err
		}
		// One family per socket, so that 0.0.0.0 and [::] can share the port.
		tcpNet, udpNet := "tcp4", "udp4"
		if ip := net.ParseIP(host); ip != nil && ip.To4() == nil {
			tcpNet, udpNet = "tcp6", "udp6"
		}
		ln, err := net.Listen(tcpNet, addr)
		if err != nil {
			return err
		}
		pc, err := net.ListenPacket(udpNet, addr)
		if err != nil {
			return err
		}
		lns, pcs = append(lns, ln), append(pcs, pc)
	}
	var st streams
	// replyDelay holds back every UDP reply, as across a wide-area network (the lab's
	// kernel may lack netem). Set from inside the partner's namespace (SetPartnerDelay).
	var replyDelay atomic.Int64
	mux := http.NewServeMux()
	mux.HandleFunc("/reply-delay", func(w http.ResponseWriter, r *http.Request) {
		if host, _, _ := net.SplitHostPort(r.RemoteAddr); !net.ParseIP(host).IsLoopback() {
			http.Error(w, "only from the partner's own namespace", http.StatusForbidden) // not from a pod
			return
		}
		d, err := time.ParseDuration(r.URL.Query().Get("d"))
		if err != nil || d < 0 {
			http.Error(w, "want d=<duration>", http.StatusBadRequest)
			return
		}
		replyDelay.Store(int64(d))
	})
	mux.HandleFunc("/stream", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(st.get(r.URL.Query().Get("id")))
	})
	// Bulk transfers: GET /bytes?n=N sends N bytes; POST /upload reads the body and
	// answers with the source address and how many bytes arrived.
	mux.HandleFunc("/bytes", func(w http.ResponseWriter, r *http.Request) {
		n, _ := strconv.Atoi(r.URL.Query().Get("n"))
		w.Header().Set("Content-Length", strconv.Itoa(n))
		chunk := make([]byte, 64<<10)
		for n > 0 {
			k := min(n, len(chunk))
			if _, err := w.Write(chunk[:k]); err != nil {
				return
			}
			n -= k
		}
	})
	mux.HandleFunc("/upload", func(w http.ResponseWriter, r *http.Request) {
		host, _, _ := net.SplitHostPort(r.RemoteAddr)
		n, _ := io.Copy(io.Discard, r.Body)
		fmt.Fprintf(w, "%s %d\n", host, n)
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		host, _, _ := net.SplitHostPort(r.RemoteAddr)
		if id := r.URL.Query().Get("stream"); id != "" {
			seq, _ := strconv.Atoi(r.URL.Query().Get("seq"))
			st.add(id, seq, host)
		} else {
			fmt.Fprintf(log, "tcp %s\n", r.RemoteAddr)
		}
		fmt.Fprintln(w, host)
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	// Each time a connection's answer went out, the log says whether the partner had to
	// send segments again since the last: a stalled long-lived connection that the
	// partner retransmitted to lost an answer, not a request.
	var retrans sync.Map // net.Conn → segments sent again so far
	srv.ConnState = func(c net.Conn, state http.ConnState) {
		switch state {
		case http.StateIdle:
			n := TCPRetransmissions(c)
			if old, _ := retrans.Swap(c, n); n > 0 && (old == nil || old.(int) != n) {
				fmt.Fprintf(log, "%s tcp %s: %d segments sent again\n", time.Now().Format("15:04:05.000"), c.RemoteAddr(), n)
			}
		case http.StateClosed, http.StateHijacked:
			retrans.Delete(c)
		}
	}
	go func() {
		<-ctx.Done()
		srv.Close()
		for _, pc := range pcs {
			pc.Close()
		}
	}()
	for _, pc := range pcs {
		go func() {
			buf := make([]byte, 2048)
			for {
				n, from, err := pc.ReadFrom(buf)
				if err != nil {
					return
				}
				host, _, _ := net.SplitHostPort(from.String())
				if f := strings.Fields(string(buf[:n])); len(f) == 3 && f[0] == "stream" {
					seq, _ := strconv.Atoi(f[2])
					st.add(f[1], seq, host)
				}
				reply := append([]byte(host+" "), buf[:n]...)
				if d := time.Duration(replyDelay.Load()); d > 0 {
					time.AfterFunc(d, func() { pc.WriteTo(reply, from) })
				} else {
					pc.WriteTo(reply, from)
				}
			}
		}()
	}
	errc := make(chan error, len(lns))
	for _, ln := range lns {
		go func() { errc <- srv.Serve(ln) }()
	}
	for range lns {
		if err := <-errc; err != nil && !errors.Is(err, http.ErrServerClosed) {
			srv.Close()
			return err
		}
	}
	return nil
}

// StreamArrivals asks the partner what arrived of stream id.
func StreamArrivals(ctx context.Context, t *Topology, id string) ([]Arrival, error) {
	resp, err := askPartner(ctx, t, "/stream?id="+url.QueryEscape(id))
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var out []Arrival
	return out, json.NewDecoder(resp.Body).Decode(&out)
}

// SetPartnerDelay makes the partner hold back each UDP reply for d (0: answer at once).
func SetPartnerDelay(ctx context.Context, t *Topology, d time.Duration) error {
	resp, err := askPartner(ctx, t, "/reply-delay?d="+d.String())
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		return fmt.Errorf("partner refused a reply delay of %s: %s", d, b)
	}
	return nil
}

// askPartner sends GET path to the partner from inside its own namespace (loopback).
// The response's Body closes the connection too.
func askPartner(ctx context.Context, t *Topology, path string) (*http.Response, error) {
	c, err := DialIn(ctx, t.Partner.Netns, "tcp", fmt.Sprintf("127.0.0.1:%d", t.Partner.Port))
	if err != nil {
		return nil, err
	}
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	fmt.Fprintf(c, "GET %s HTTP/1.0\r\n\r\n", path)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		c.Close()
		return nil, err
	}
	resp.Body = bodyAndConn{resp.Body, c}
	return resp, nil
}

type bodyAndConn struct {
	io.ReadCloser
	conn net.Conn
}

func (b bodyAndConn) Close() error {
	b.ReadCloser.Close()
	return b.conn.Close()
}

// SourceSeen asks the partner, from inside network namespace ns, which source address
// it saw for a fresh TCP connection or a UDP datagram (network "tcp" or "udp") to addr:
// the partner's own address, or anything that leads to it, e.g. the ClusterIP and port
// of a Service whose endpoint is the partner (CreateEndpointService).
func SourceSeen(ctx context.Context, ns, network, addr string) (string, error) {
	switch network {
	case "tcp":
		return SourceSeenTCP(ctx, ns, addr)
	case "udp":
		return SourceSeenUDP(ctx, ns, addr)
	}
	return "", fmt.Errorf("network %q is neither tcp nor udp", network)
}

// SourceSeenTCP asks the partner, from inside network namespace ns, which source
// address it saw for a fresh TCP connection to addr (see SourceSeen).
func SourceSeenTCP(ctx context.Context, ns string, addr string) (string, error) {
	c, err := DialIn(ctx, ns, "tcp", addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	fmt.Fprintf(c, "GET / HTTP/1.0\r\nHost: partner\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(body)), nil
}

// SourceSeenUDP sends one datagram from inside ns to addr (see SourceSeen) and returns
// the source address the echo says the partner saw.
func SourceSeenUDP(ctx context.Context, ns string, addr string) (string, error) {
	c, err := DialIn(ctx, ns, "udp", addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	payload := fmt.Sprintf("probe-%d", time.Now().UnixNano())
	buf := make([]byte, 2048)
	// UDP may be lost; send a few times within the deadline.
	for {
		if _, err := c.Write([]byte(payload)); err != nil {
			return "", err
		}
		c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		n, err := c.Read(buf)
		if err == nil {
			host, rest, _ := strings.Cut(string(buf[:n]), " ")
			if rest == payload {
				return host, nil
			}
			continue
		}
		if ctx.Err() != nil {
			return "", fmt.Errorf("no UDP echo: %w", ctx.Err())
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			continue
		}
		// ECONNREFUSED after an ICMP error, e.g. a drop with reject: keep trying.
		if errors.Is(err, syscall.ECONNREFUSED) {
			time.Sleep(100 * time.Millisecond)
			continue
		}
		return "", err
	}
}

// withLock serialises changes to a lab's topology between natd-lab processes.
func withLock(dir string, fn func() error) error {
	f, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		return err
	}
	defer syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
	return fn()
}

// TCPRetransmissions is how many segments c's side has sent again (TCP_INFO; -1 if
// unknown).
func TCPRetransmissions(c net.Conn) int {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return -1
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return -1
	}
	n := -1
	rc.Control(func(fd uintptr) { //nolint:errcheck // unknown stays -1
		if info, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
			n = int(info.Total_retrans)
		}
	})
	return n
}
