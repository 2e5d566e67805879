package dataplane

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"

	"golang.org/x/sys/unix"
)

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
