// The property collector's waiting methods, for the test peer.
//
// govmomi 0.24's PropertyCollector gathers registry updates and looks at them on a 250 ms
// ticker, so WaitForUpdatesEx answers a change 0-250 ms late; its update handler is keyed by
// the collector's reference, which every session's default PropertyCollector shares, so only
// the last session to start waiting is told of changes; it has no CheckForUpdates. vCenter
// answers as soon as a change is there (vSphere API reference, PropertyCollector).
//
// peerPC keeps govmomi's PropertyCollector for everything else (filters, RetrievePropertiesEx,
// views) and answers WaitForUpdatesEx, WaitForUpdates, CheckForUpdates and CancelWaitForUpdates
// by comparing what each filter retrieves now with what it reported at the last version:
//   - version "": every object of every filter, kind "enter", returned at once;
//   - the current version: the objects that entered or left a filter and the properties whose
//     values changed since (kind "modify", op "assign"); a filter created since that version
//     reports its objects as "enter"; another version: InvalidCollectorVersion;
//   - options.maxWaitSeconds (WaitForUpdatesEx): unset waits until there is a change, 0 computes
//     once and returns, N > 0 returns null (no update set) after N seconds without a change;
//     WaitForUpdates waits without limit; CheckForUpdates never waits (reference: "does not
//     block"), null when nothing changed;
//   - CancelWaitForUpdates makes waiting calls fail with RequestCanceled; a waiting call of a
//     session that has been terminated or logged out fails with NotAuthenticated (checked
//     each second), as vCenter ends a dead session's calls.
//
// Waking: every registry Put/Update/Remove and every change to our event collectors closes the
// notifier's channel; a waiting call then recomputes its filters at once. Options such as
// maxObjectUpdates (truncation) are not implemented.
package main

import (
	"reflect"
	"strconv"
	"sync"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// notify is the process's notifier (set by installPeer).
var notify *notifier

type peerPC struct {
	simulator.PropertyCollector // first: the property collector finds the mo type here

	st      sync.Mutex
	version int64
	state   map[ref]map[ref]map[string]interface{} // filter -> object -> property -> value

	cmu    sync.Mutex
	cancel chan struct{}
}

func (pc *peerPC) cancelled() <-chan struct{} {
	pc.cmu.Lock()
	defer pc.cmu.Unlock()
	if pc.cancel == nil {
		pc.cancel = make(chan struct{})
	}
	return pc.cancel
}

func (pc *peerPC) CancelWaitForUpdates(r *types.CancelWaitForUpdates) soap.HasFault {
	pc.cmu.Lock()
	if pc.cancel != nil {
		close(pc.cancel)
	}
	pc.cancel = make(chan struct{})
	pc.cmu.Unlock()
	return &methods.CancelWaitForUpdatesBody{Res: new(types.CancelWaitForUpdatesResponse)}
}

func (pc *peerPC) CreatePropertyCollector(ctx *simulator.Context, c *types.CreatePropertyCollector) soap.HasFault {
	cpc := &peerPC{}
	cpc.Self.Type = "PropertyCollector"
	return &methods.CreatePropertyCollectorBody{
		Res: &types.CreatePropertyCollectorResponse{Returnval: ctx.Session.Put(cpc).Reference()},
	}
}

func (pc *peerPC) DestroyPropertyCollector(ctx *simulator.Context, c *types.DestroyPropertyCollector) soap.HasFault {
	pc.CancelWaitForUpdates(&types.CancelWaitForUpdates{This: c.This})
	return pc.PropertyCollector.DestroyPropertyCollector(ctx, c)
}

func (pc *peerPC) WaitForUpdatesEx(ctx *simulator.Context, r *types.WaitForUpdatesEx) soap.HasFault {
	wait := time.Duration(-1)
	if r.Options != nil && r.Options.MaxWaitSeconds != nil {
		wait = time.Duration(*r.Options.MaxWaitSeconds) * time.Second
		if wait < 0 {
			wait = 0
		}
	}
	body := new(methods.WaitForUpdatesExBody)
	set, fault := pc.waitFor(ctx, r.Version, wait)
	if fault != nil {
		body.Fault_ = fault
	} else {
		body.Res = &types.WaitForUpdatesExResponse{Returnval: set}
	}
	return body
}

func (pc *peerPC) WaitForUpdates(ctx *simulator.Context, r *types.WaitForUpdates) soap.HasFault {
	body := new(methods.WaitForUpdatesBody)
	set, fault := pc.waitFor(ctx, r.Version, -1)
	if fault != nil {
		body.Fault_ = fault
	} else {
		if set == nil {
			set = &types.UpdateSet{Version: r.Version}
		}
		body.Res = &types.WaitForUpdatesResponse{Returnval: *set}
	}
	return body
}

func (pc *peerPC) CheckForUpdates(ctx *simulator.Context, r *types.CheckForUpdates) soap.HasFault {
	body := new(methods.CheckForUpdatesBody)
	set, fault := pc.waitFor(ctx, r.Version, 0)
	if fault != nil {
		body.Fault_ = fault
	} else {
		body.Res = &types.CheckForUpdatesResponse{Returnval: set}
	}
	return body
}

// waitFor returns the next update set after version, waiting up to wait (< 0: no limit).
func (pc *peerPC) waitFor(ctx *simulator.Context, version string, wait time.Duration) (*types.UpdateSet, *soap.Fault) {
	cancel := pc.cancelled()
	var deadline <-chan time.Time
	if wait > 0 {
		t := time.NewTimer(wait)
		defer t.Stop()
		deadline = t.C
	}
	alive := time.NewTicker(time.Second)
	defer alive.Stop()
	for {
		changed := notify.changed() // before computing: a change during the computation wakes us
		set, fault := pc.updates(ctx, version)
		if fault != nil || set != nil || wait == 0 {
			return set, fault
		}
		select {
		case <-changed:
		case <-deadline:
			return nil, nil
		case <-cancel:
			return nil, simulator.Fault("", new(types.RequestCanceled))
		case <-alive.C:
			if !sessionActive(ctx) {
				return nil, simulator.Fault("", &types.NotAuthenticated{
					NoPermission: types.NoPermission{Object: pc.Self, PrivilegeId: "System.View"}})
			}
		}
	}
}

func sessionActive(ctx *simulator.Context) bool {
	if ctx.Session == nil {
		return false
	}
	sm := simulator.Map.SessionManager()
	res := sm.SessionIsActive(ctx, &types.SessionIsActive{This: sm.Self,
		SessionID: ctx.Session.Key, UserName: ctx.Session.UserName})
	body, ok := res.(*methods.SessionIsActiveBody)
	return ok && body.Res != nil && body.Res.Returnval
}

// updates computes the changes since version; nil when there are none (and version is not "").
func (pc *peerPC) updates(ctx *simulator.Context, version string) (*types.UpdateSet, *soap.Fault) {
	pc.st.Lock()
	defer pc.st.Unlock()
	if version == "" {
		pc.state = nil
	} else if version != strconv.FormatInt(pc.version, 10) {
		return nil, simulator.Fault("", new(types.InvalidCollectorVersion))
	}
	state := make(map[ref]map[ref]map[string]interface{}, len(pc.Filter))
	var filters []types.PropertyFilterUpdate
	for _, fref := range pc.Filter {
		filter, ok := ctx.Session.Get(fref).(*simulator.PropertyFilter)
		if !ok {
			continue
		}
		now, fault := pc.snapshot(ctx, filter.Spec)
		if fault != nil {
			return nil, fault
		}
		state[fref] = now.values
		if fu := diff(fref, pc.state[fref], now); len(fu.ObjectSet) > 0 {
			filters = append(filters, fu)
		}
	}
	pc.state = state
	if version != "" && len(filters) == 0 {
		return nil, nil
	}
	pc.version++
	return &types.UpdateSet{Version: strconv.FormatInt(pc.version, 10), FilterSet: filters}, nil
}

type snapshot struct {
	order  []ref
	values map[ref]map[string]interface{}
}

func (pc *peerPC) snapshot(ctx *simulator.Context, spec types.PropertyFilterSpec) (snapshot, *soap.Fault) {
	spec.ReportMissingObjectsInResults = types.NewBool(true) // a destroyed object leaves
	res := pc.PropertyCollector.RetrievePropertiesEx(ctx, &types.RetrievePropertiesEx{
		This: pc.Self, SpecSet: []types.PropertyFilterSpec{spec}})
	if f := res.Fault(); f != nil {
		return snapshot{}, f
	}
	s := snapshot{values: map[ref]map[string]interface{}{}}
	if body, ok := res.(*methods.RetrievePropertiesExBody); ok && body.Res != nil && body.Res.Returnval != nil {
		for _, o := range body.Res.Returnval.Objects {
			props := make(map[string]interface{}, len(o.PropSet))
			for _, p := range o.PropSet {
				props[p.Name] = p.Val
			}
			if _, dup := s.values[o.Obj]; !dup {
				s.order = append(s.order, o.Obj)
			}
			s.values[o.Obj] = props
		}
	}
	return s, nil
}

func diff(filter ref, before map[ref]map[string]interface{}, now snapshot) types.PropertyFilterUpdate {
	fu := types.PropertyFilterUpdate{Filter: filter}
	for _, obj := range now.order {
		props := now.values[obj]
		old, seen := before[obj]
		if !seen {
			ou := types.ObjectUpdate{Kind: types.ObjectUpdateKindEnter, Obj: obj}
			for _, name := range sortedKeys(props) {
				ou.ChangeSet = append(ou.ChangeSet, types.PropertyChange{
					Name: name, Op: types.PropertyChangeOpAssign, Val: props[name]})
			}
			fu.ObjectSet = append(fu.ObjectSet, ou)
			continue
		}
		ou := types.ObjectUpdate{Kind: types.ObjectUpdateKindModify, Obj: obj}
		for _, name := range sortedKeys(props) {
			if was, ok := old[name]; !ok || !reflect.DeepEqual(was, props[name]) {
				ou.ChangeSet = append(ou.ChangeSet, types.PropertyChange{
					Name: name, Op: types.PropertyChangeOpAssign, Val: props[name]})
			}
		}
		for _, name := range sortedKeys(old) {
			if _, ok := props[name]; !ok { // now unset
				ou.ChangeSet = append(ou.ChangeSet, types.PropertyChange{
					Name: name, Op: types.PropertyChangeOpAssign})
			}
		}
		if len(ou.ChangeSet) > 0 {
			fu.ObjectSet = append(fu.ObjectSet, ou)
		}
	}
	for obj := range before {
		if _, ok := now.values[obj]; !ok {
			fu.ObjectSet = append(fu.ObjectSet, types.ObjectUpdate{Kind: types.ObjectUpdateKindLeave, Obj: obj})
		}
	}
	return fu
}

func sortedKeys(m map[string]interface{}) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	for i := 1; i < len(keys); i++ { // small maps: insertion sort
		for j := i; j > 0 && keys[j] < keys[j-1]; j-- {
			keys[j], keys[j-1] = keys[j-1], keys[j]
		}
	}
	return keys
}
