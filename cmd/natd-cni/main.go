// Command natd-cni is natd's chained CNI plugin (see natd/cniplugin).
package main

import "natd.dev/natd/natd/cniplugin"

func main() { cniplugin.Main() }
