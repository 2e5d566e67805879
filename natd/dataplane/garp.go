package dataplane

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"

	"github.com/mdlayher/ndp"
	"golang.org/x/sys/unix"
)

// sendAnnouncement tells the link that ip now lives at mac: a gratuitous ARP for an
// IPv4 address, an unsolicited neighbour advertisement for an IPv6 one.
func sendAnnouncement(ifindex int, mac net.HardwareAddr, ip netip.Addr) error {
	if ip.Is4() {
		return sendGratuitousARP(ifindex, mac, ip)
	}
	return sendUnsolicitedNA(ifindex, mac, ip)
}

// sendUnsolicitedNA announces an IPv6 address the way RFC 4861 (7.2.6) has a node
// announce a changed link-layer address: a neighbour advertisement to all nodes, from
// the address itself, with the override flag, so that neighbours (the router above
// all) that have an entry for it replace the previous holder's MAC at once.
func sendUnsolicitedNA(ifindex int, mac net.HardwareAddr, ip netip.Addr) error {
	ifi, err := net.InterfaceByIndex(ifindex)
	if err != nil {
		return fmt.Errorf("finding interface %d: %w", ifindex, err)
	}
	conn, _, err := ndp.Listen(ifi, ndp.Addr(ip.String()))
	if err != nil {
		return fmt.Errorf("opening an ICMPv6 socket on %s for %s: %w", ip, ifi.Name, err)
	}
	defer conn.Close() //nolint:errcheck // sent or not, the socket is done
	na := &ndp.NeighborAdvertisement{Override: true, TargetAddress: ip,
		Options: []ndp.Option{&ndp.LinkLayerAddress{Direction: ndp.Target, Addr: mac}}}
	if err := conn.WriteTo(na, nil, netip.IPv6LinkLocalAllNodes()); err != nil {
		return fmt.Errorf("sending neighbour advertisement for %s: %w", ip, err)
	}
	return nil
}

// sendGratuitousARP announces that ip now lives at link's MAC address, so neighbours
// (the router above all) replace a cached entry for the previous holder at once instead
// of waiting for it to go stale. It sends both forms: a request (what Linux's arping -U
// sends) and a reply (arping -A), since devices differ in which one updates their cache.
func sendGratuitousARP(ifindex int, mac net.HardwareAddr, ip netip.Addr) error {
	if len(mac) != 6 {
		return fmt.Errorf("interface %d has no Ethernet address", ifindex)
	}
	// SOCK_DGRAM: the kernel builds the Ethernet header from the sockaddr.
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM, int(htons(unix.ETH_P_ARP)))
	if err != nil {
		return fmt.Errorf("opening packet socket: %w", err)
	}
	defer unix.Close(fd) //nolint:errcheck // sent or not, the socket is done
	to := &unix.SockaddrLinklayer{Ifindex: ifindex, Protocol: htons(unix.ETH_P_ARP), Halen: 6,
		Addr: [8]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}}
	for _, op := range []uint16{1, 2} {
		if err := unix.Sendto(fd, arpPacket(op, mac, ip), 0, to); err != nil {
			return fmt.Errorf("sending gratuitous ARP for %s: %w", ip, err)
		}
	}
	return nil
}

// arpPacket is an ARP packet (RFC 826) whose sender and target protocol address are
// both ip: the gratuitous form.
func arpPacket(op uint16, mac net.HardwareAddr, ip netip.Addr) []byte {
	b := make([]byte, 28)
	binary.BigEndian.PutUint16(b[0:], 1)      // Ethernet
	binary.BigEndian.PutUint16(b[2:], 0x0800) // IPv4
	b[4], b[5] = 6, 4
	binary.BigEndian.PutUint16(b[6:], op)
	a := ip.As4()
	copy(b[8:], mac)
	copy(b[14:], a[:])
	if op == 2 {
		copy(b[18:], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	}
	copy(b[24:], a[:])
	return b
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }
