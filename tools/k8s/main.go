// Command k8s is a local Kubernetes control plane in one binary, chosen by the name it is run as
// (busybox-style links): etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl,
// and KWOK's kwok (fake kubelets) and kwokctl (which starts the others). One binary links once:
// on two cores each link of a Kubernetes command costs about a minute, the compile is shared.
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"go.etcd.io/etcd/server/v3/etcdmain"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	kubectlcmd "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kwokconfig "sigs.k8s.io/kwok/pkg/config"
	kwokcmd "sigs.k8s.io/kwok/pkg/kwok/cmd"
	kwokctlcmd "sigs.k8s.io/kwok/pkg/kwokctl/cmd"
	_ "sigs.k8s.io/kwok/pkg/kwokctl/runtime/binary"
	kwoklog "sigs.k8s.io/kwok/pkg/log"
	"sigs.k8s.io/kwok/pkg/utils/signals"
)

func main() {
	name := filepath.Base(os.Args[0])
	args := os.Args
	// `k8s NAME ...` works as well as a link named NAME.
	if name == "k8s" && len(args) > 1 {
		name, args = args[1], args[1:]
		os.Args = args
	}
	switch name {
	case "etcd":
		etcdmain.Main(args)
	case "kube-apiserver":
		os.Exit(cli.Run(apiserver.NewAPIServerCommand()))
	case "kube-controller-manager":
		os.Exit(cli.Run(controllermanager.NewControllerManagerCommand()))
	case "kube-scheduler":
		os.Exit(cli.Run(scheduler.NewSchedulerCommand()))
	case "kubectl":
		if err := cli.RunNoErrOutput(kubectlcmd.NewDefaultKubectlCommand()); err != nil {
			kubectlutil.CheckErr(err)
		}
	case "kwok", "kwok-controller": // kwokctl links it as kwok-controller
		os.Exit(runKwok(kwokcmd.NewCommand))
	case "kwokctl":
		os.Exit(runKwok(kwokctlcmd.NewCommand))
	default:
		names := "etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok, kwokctl"
		fmt.Fprintf(os.Stderr, "k8s: run as one of %s (a link of that name, or `k8s NAME`), not %q\n",
			names, strings.TrimSpace(name))
		os.Exit(2)
	}
}

// runKwok is the main of KWOK's own kwok and kwokctl commands.
func runKwok(newCommand func(context.Context) *cobra.Command) int {
	// Kubernetes' packages register a tristate --version on pflag's global set, which cobra merges
	// into KWOK's commands and then fails to read as its own boolean --version: KWOK gets a clean set.
	pflag.CommandLine = pflag.NewFlagSet(os.Args[0], pflag.ExitOnError)
	flagset := pflag.NewFlagSet("global", pflag.ContinueOnError)
	flagset.ParseErrorsAllowlist.UnknownFlags = true
	flagset.Usage = func() {}
	ctx := signals.SetupSignalContext()
	ctx, logger := kwoklog.InitFlags(ctx, flagset)
	ctx, err := kwokconfig.InitFlags(ctx, flagset)
	if err != nil {
		_, _ = os.Stderr.Write([]byte(flagset.FlagUsages()))
		logger.Error("Init config flags", "err", err)
		return 1
	}
	command := newCommand(ctx)
	command.PersistentFlags().AddFlagSet(flagset)
	if err := command.ExecuteContext(ctx); err != nil {
		logger.Error("Execute exit", "err", err)
		return 1
	}
	return 0
}
