// The event side of the test peer: an EventManager store and EventHistoryCollectors written for
// this project, in place of govmomi 0.24's (which do not page forward, ignore time filters,
// mis-order the first page and can deadlock in DestroyCollector against PostEvent).
//
// What each behaviour models, and where the facts come from:
//
//   - Paging (vSphere API reference, HistoryCollector / EventHistoryCollector): the items of a
//     collector are the events matching its filter, in key (creation) order. ReadNextEvents reads
//     forward from the position and moves it past what it returned; events posted later that
//     match are appended, so each is returned once. ReadPreviousEvents reads backward from the
//     position; the API describes that direction as "from the newest item to the oldest item",
//     so each of its pages is newest first (our choice for the order inside a page, which the
//     reference does not spell out). RewindCollector moves to the oldest item the collector
//     still holds (the position of a new collector); ResetCollector to the item immediately
//     preceding the latest page. Both: "scrollable view" wording of the reference.
//   - latestPage (reference: "the newest pageSize matching events"; the vSphere Web Services
//     programming guide: a new event is placed "in the first position of the latestPage"):
//     newest first, like Debian's simulator and vCenter. SetCollectorPageSize accepts 0..1000
//     (the reference: "at most maxCount items", so 0 is an empty page); < 0 or > 1000 is
//     InvalidArgument. A filter maxCount of 0 (unset) gives the page size 10, as Debian's
//     simulator and upstream govmomi do; > 1000 or < 0 is InvalidArgument.
//   - ReadNextEvents / ReadPreviousEvents with maxCount <= 0: InvalidArgument (reference:
//     "Thrown if maxCount is out of range"; current govmomi accepts 1001 and more, so do we).
//   - The filter (reference, EventFilterSpec and its By* types): time.beginTime/endTime
//     (inclusive, for history and new events), entity + recursion (self / children / all;
//     an event without entity arguments belongs to the root folder, so the root folder with
//     "all" or "self" matches every event; "children" are the descendants in the inventory
//     tree, a virtual machine also being a child of its host and resource pool; for a Folder
//     or ResourcePool "self" means the entities it contains, as the reference says folders
//     and pools cannot be queried themselves), eventTypeId and the deprecated type (class
//     names, with or without "vim.event.", and the eventTypeId of EventEx/ExtendedEvent),
//     category (an EventEx's severity, else the EventManager's description.eventInfo, else
//     "user"/"warning"/"error" for the General*Event classes and "info"), userName (systemUser:
//     events without a user; userList, unset: every regular user), eventChainId, alarm,
//     scheduledTask, tag (Event.changeTag), maxCount, disableFullMessage (true: events come
//     without fullFormattedMessage; unset: with it, as vCenter and govmomi send it).
//   - Capacity (current govmomi since v0.37, not vCenter: see the vcsim notes in
//     shared/reference): a collector takes at most -collector-capacity events *posted after
//     it was created* that it has not returned yet. When a post would put it more than that
//     behind, it goes stale, silently and for good: its reads return nothing, no fault. Its
//     history at creation (every retained matching event, paged forward) is read like a
//     vCenter reads its event database, so a new collector can always catch up with what the
//     server still retains (current govmomi keeps only ~1,000 events in all, so there the two
//     bounds coincide). -collector-capacity 0: no limit.
//     A stale collector's latestPage keeps updating: latestPage is the server's view of the
//     newest matching events, separate from the read position, and that is the very symptom a
//     reader must be able to see (VEBA issue #1054: a collector that stopped returning events
//     while vCenter had new ones).
//   - 32 event collectors in all, across sessions (current govmomi): the next
//     CreateCollectorForEvents fails with InvalidState "Too many event collectors to create";
//     only DestroyCollector frees one; a session that logs out or is terminated keeps its
//     collectors counted (they live on, and go stale).
//   - Retention (-event-retention, a vCenter's event-database retention): the manager keeps the
//     newest N events; older ones are gone for every collector, QueryEvents included.
//   - EventManager.latestEvent (reference: "the latest event that happened on the server"):
//     set on every post (Debian's PostEvent does not set it).
//   - PostEvent itself stays Debian's (key = previous + 1, chainId = key, createdTime,
//     userName of the session, fullFormattedMessage from the description templates); this file
//     learns of every post, the simulator's own included, through a hidden one-event collector
//     of Debian's ("the tap") whose latestPage change the registry reports to our handler.
//   - QueryEvents: the filter as above, newest first, at most maxCount events (unset: 1000),
//     and no collector is used up (Debian's creates one per call and never frees it).
//
// Locking, one order for the whole program (outermost first):
//  1. peerPC.st (a property collector's update state; WaitForUpdates* only)
//  2. govmomi's per-object locks (the EventManager's, held through every PostEvent; the tap's;
//     the per-reference locks the property collector takes while reading an object)
//  3. peer.mu (this file: the event store and every collector)
//  4. the registries' own mutexes (inside Map.Get/Put/Update/Remove)
//  5. notifier.mu (leaf)
//
// Code holding peer.mu takes no govmomi object lock (inventory walks read without locks, as
// govmomi's own event filter does), and our managed objects have no-op Lock methods, so the
// simulator's dispatcher holds nothing while they run. Debian's deadlock (collector lock then
// EventManager lock in DestroyCollector, the reverse in PostEvent) cannot happen here.
package main

import (
	"reflect"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

const (
	maxPageSize     = 1000 // SetCollectorPageSize's and the filter maxCount's upper bound
	defaultPageSize = 10   // filter maxCount unset
	queryLimit      = 1000 // QueryEvents with maxCount unset
)

type ref = types.ManagedObjectReference

// peerEntry is one posted event with what the filters look at, computed once.
type peerEntry struct {
	seq      int64 // position in the store (keys are int32 and could wrap)
	ev       types.BaseEvent
	class    string // the vSphere class name (= the Go type name)
	typeID   string // EventEx / ExtendedEvent eventTypeId
	category string
	user     string
	created  time.Time
	chain    int32
	tag      string
	alarm    *ref
	sched    *ref
	args     []ref // entity arguments; the root folder if none

	walked  bool
	parents []ref // direct parents of args (inventory tree)
	above   []ref // every strict ancestor of args
}

type peer struct {
	mu sync.Mutex

	capacity      int // 0: unlimited
	maxCollectors int
	retention     int

	log        []*peerEntry // retained events, oldest first
	seq        int64
	collectors []*peerCollector // created and not destroyed (live and stale)
	categories map[string]string

	em      *simulator.EventManager
	emRef   ref
	rootRef ref
	tapRef  ref
	notify  *notifier
}

// --- the store

func (p *peer) entry(ev types.BaseEvent) *peerEntry {
	e := ev.GetEvent()
	p.seq++
	en := &peerEntry{seq: p.seq, ev: ev, class: reflect.TypeOf(ev).Elem().Name(),
		user: e.UserName, created: e.CreatedTime, chain: e.ChainId, tag: e.ChangeTag}
	switch x := ev.(type) {
	case *types.EventEx:
		en.typeID = x.EventTypeId
		en.category = x.Severity
	case *types.ExtendedEvent:
		en.typeID = x.EventTypeId
	}
	if en.category == "" {
		en.category = p.categoryOf(en)
	}
	v := reflect.ValueOf(ev).Elem()
	if f := v.FieldByName("Alarm"); f.IsValid() {
		if a, ok := f.Interface().(types.AlarmEventArgument); ok {
			en.alarm = &a.Alarm
		}
	}
	if f := v.FieldByName("ScheduledTask"); f.IsValid() {
		if s, ok := f.Interface().(types.ScheduledTaskEventArgument); ok {
			en.sched = &s.ScheduledTask
		}
	}
	if a := e.Datacenter; a != nil {
		en.args = append(en.args, a.Datacenter)
	}
	if a := e.ComputeResource; a != nil {
		en.args = append(en.args, a.ComputeResource)
	}
	if a := e.Host; a != nil {
		en.args = append(en.args, a.Host)
	}
	if a := e.Vm; a != nil {
		en.args = append(en.args, a.Vm)
	}
	if a := e.Ds; a != nil {
		en.args = append(en.args, a.Datastore)
	}
	if a := e.Net; a != nil {
		en.args = append(en.args, a.Network)
	}
	if a := e.Dvs; a != nil {
		en.args = append(en.args, a.Dvs)
	}
	if len(en.args) == 0 {
		en.args = []ref{p.rootRef}
	}
	return en
}

func (p *peer) categoryOf(en *peerEntry) string {
	key := en.class
	if en.typeID != "" {
		key = en.typeID
	}
	if c, ok := p.categories[key]; ok && c != "" {
		return c
	}
	switch en.class {
	case "GeneralUserEvent":
		return "user"
	case "GeneralWarningEvent":
		return "warning"
	case "GeneralHostErrorEvent", "GeneralVmErrorEvent":
		return "error"
	}
	return "info"
}

// walk fills the entry's inventory ancestry (lazily: the producer's root-folder filter never
// needs it). Reads the inventory without its locks (see the lock order above).
func (p *peer) walk(en *peerEntry) {
	if en.walked {
		return
	}
	en.walked = true
	seen := map[ref]bool{}
	var up func(r ref, depth int)
	up = func(r ref, depth int) {
		for _, parent := range parentsOf(r) {
			if depth == 0 {
				en.parents = append(en.parents, parent)
			}
			if !seen[parent] {
				seen[parent] = true
				en.above = append(en.above, parent)
				up(parent, depth+1)
			}
		}
	}
	for _, a := range en.args {
		up(a, 0)
	}
}

func parentsOf(r ref) []ref {
	obj := simulator.Map.Get(r)
	if obj == nil {
		return nil
	}
	var out []ref
	if e, ok := obj.(mo.Entity); ok {
		if parent := e.Entity().Parent; parent != nil {
			out = append(out, *parent)
		}
	}
	if vm, ok := obj.(*simulator.VirtualMachine); ok {
		if vm.ResourcePool != nil {
			out = append(out, *vm.ResourcePool)
		}
		if vm.Runtime.Host != nil {
			out = append(out, *vm.Runtime.Host)
		}
	}
	return out
}

func hasRef(list []ref, r ref) bool {
	for _, x := range list {
		if x == r {
			return true
		}
	}
	return false
}

// post adds a posted event (called for every PostEvent, under the EventManager's lock).
func (p *peer) post(ev types.BaseEvent) {
	p.mu.Lock()
	en := p.entry(ev)
	p.log = append(p.log, en)
	if len(p.log) > p.retention {
		p.log = p.log[len(p.log)-p.retention:]
		p.forget(p.log[0].seq)
	}
	for _, c := range p.collectors {
		if c.filter.match(p, en) {
			c.add(en)
		}
	}
	p.mu.Unlock()
}

// forget drops, from every collector, events older than the oldest retained one.
func (p *peer) forget(oldest int64) {
	for _, c := range p.collectors {
		n := 0
		for n < len(c.buf) && c.buf[n].seq < oldest {
			n++
		}
		if n > 0 {
			c.buf = c.buf[n:]
			c.pos = maxInt(c.pos-n, 0)
			c.histEnd = maxInt(c.histEnd-n, 0)
		}
		n = 0
		for n < len(c.latest) && c.latest[n].seq < oldest {
			n++
		}
		c.latest = c.latest[n:]
	}
}

func (p *peer) matching(f *peerFilter) []*peerEntry {
	var out []*peerEntry
	for _, en := range p.log {
		if f.match(p, en) {
			out = append(out, en)
		}
	}
	return out
}

type collectorStats struct {
	Live      int  `json:"live"`
	Stale     int  `json:"stale"`
	Limit     int  `json:"limit"`
	Capacity  int  `json:"capacity"`
	Retention int  `json:"retention"`
	Events    int  `json:"events"`
	Legacy    bool `json:"legacy"`
}

func (p *peer) stats() collectorStats {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := collectorStats{Limit: p.maxCollectors, Capacity: p.capacity, Retention: p.retention,
		Events: len(p.log)}
	for _, c := range p.collectors {
		if c.stale {
			s.Stale++
		} else {
			s.Live++
		}
	}
	return s
}

// --- the filter

type peerFilter struct {
	begin, end *time.Time
	entity     *ref
	recursion  types.EventFilterSpecRecursionOption
	container  bool // entity is a Folder or ResourcePool
	isRoot     bool
	types      map[string]bool
	categories map[string]bool
	user       *types.EventFilterSpecByUsername
	users      map[string]bool
	chain      int32
	alarm      *ref
	sched      *ref
	tags       map[string]bool
	noMessage  bool
}

func set(items []string, trim string) map[string]bool {
	if len(items) == 0 {
		return nil
	}
	m := make(map[string]bool, len(items))
	for _, s := range items {
		m[strings.TrimPrefix(s, trim)] = true
	}
	return m
}

func (p *peer) compile(spec types.EventFilterSpec) (*peerFilter, *soap.Fault) {
	f := &peerFilter{chain: spec.EventChainId, alarm: spec.Alarm, sched: spec.ScheduledTask,
		categories: set(spec.Category, ""), tags: set(spec.Tag, ""),
		noMessage: spec.DisableFullMessage != nil && *spec.DisableFullMessage}
	if spec.Time != nil {
		f.begin, f.end = spec.Time.BeginTime, spec.Time.EndTime
	}
	if ids := append(append([]string{}, spec.EventTypeId...), spec.Type...); len(ids) > 0 {
		f.types = set(ids, "vim.event.")
	}
	if spec.UserName != nil {
		f.user = spec.UserName
		f.users = set(spec.UserName.UserList, "")
	}
	if e := spec.Entity; e != nil {
		if simulator.Map.Get(e.Entity) == nil {
			return nil, simulator.Fault("", &types.ManagedObjectNotFound{Obj: e.Entity})
		}
		f.entity = &e.Entity
		f.recursion = e.Recursion
		if f.recursion == "" {
			f.recursion = types.EventFilterSpecRecursionOptionAll
		}
		f.isRoot = e.Entity == p.rootRef
		f.container = e.Entity.Type == "Folder" || e.Entity.Type == "ResourcePool"
	}
	return f, nil
}

func (f *peerFilter) match(p *peer, en *peerEntry) bool {
	if f.begin != nil && en.created.Before(*f.begin) {
		return false
	}
	if f.end != nil && en.created.After(*f.end) {
		return false
	}
	if f.types != nil && !f.types[en.class] && (en.typeID == "" || !f.types[en.typeID]) {
		return false
	}
	if f.categories != nil && !f.categories[en.category] {
		return false
	}
	if f.user != nil {
		if en.user == "" {
			if !f.user.SystemUser {
				return false
			}
		} else if f.users != nil && !f.users[en.user] {
			return false
		}
	}
	if f.chain != 0 && en.chain != f.chain {
		return false
	}
	if f.alarm != nil && (en.alarm == nil || *en.alarm != *f.alarm) {
		return false
	}
	if f.sched != nil && (en.sched == nil || *en.sched != *f.sched) {
		return false
	}
	if f.tags != nil && !f.tags[en.tag] {
		return false
	}
	if f.entity == nil {
		return true
	}
	self := hasRef(en.args, *f.entity)
	switch f.recursion {
	case types.EventFilterSpecRecursionOptionSelf:
		if self || (f.isRoot && len(en.args) == 1 && en.args[0] == p.rootRef) {
			return true
		}
		if f.container {
			p.walk(en)
			return hasRef(en.parents, *f.entity)
		}
		return false
	case types.EventFilterSpecRecursionOptionChildren:
		p.walk(en)
		return hasRef(en.above, *f.entity)
	default: // all
		if self || f.isRoot {
			return true
		}
		p.walk(en)
		return hasRef(en.above, *f.entity)
	}
}

func (f *peerFilter) events(list []*peerEntry, newestFirst bool) []types.BaseEvent {
	if len(list) == 0 {
		return nil
	}
	out := make([]types.BaseEvent, len(list))
	for i, en := range list {
		j := i
		if newestFirst {
			j = len(list) - 1 - i
		}
		out[j] = en.ev
		if f.noMessage {
			out[j] = withoutMessage(en.ev)
		}
	}
	return out
}

func withoutMessage(ev types.BaseEvent) types.BaseEvent {
	v := reflect.ValueOf(ev).Elem()
	c := reflect.New(v.Type())
	c.Elem().Set(v)
	out := c.Interface().(types.BaseEvent)
	out.GetEvent().FullFormattedMessage = ""
	return out
}

// --- the EventManager methods we answer (the front end routes them here, see front.go)

// peerEventManager answers CreateCollectorForEvents and QueryEvents for the EventManager; it is
// registered under its own reference, and the rest of the EventManager (PostEvent, properties)
// stays Debian's.
type peerEventManager struct {
	mo.EventManager
	p *peer
}

func (*peerEventManager) Lock()   {}
func (*peerEventManager) Unlock() {}

func validPageSize(n int32, zero int) (int, *soap.Fault) {
	if n < 0 || n > maxPageSize {
		return 0, simulator.Fault("", &types.InvalidArgument{InvalidProperty: "maxCount"})
	}
	if n == 0 {
		return zero, nil
	}
	return int(n), nil
}

func (m *peerEventManager) CreateCollectorForEvents(ctx *simulator.Context, req *types.CreateCollectorForEvents) soap.HasFault {
	body := new(methods.CreateCollectorForEventsBody)
	p := m.p
	size, fault := validPageSize(req.Filter.MaxCount, defaultPageSize)
	if fault == nil {
		var f *peerFilter
		if f, fault = p.compile(req.Filter); fault == nil {
			p.mu.Lock()
			if len(p.collectors) >= p.maxCollectors {
				fault = simulator.Fault("Too many event collectors to create", new(types.InvalidState))
			} else {
				c := &peerCollector{p: p, filter: f, pageSize: size, session: ctx.Session.Key}
				c.Self.Type = "EventHistoryCollector"
				c.Filter = req.Filter
				hist := p.matching(f)
				c.latest = tail(hist, size)
				c.buf, c.histEnd = hist, len(hist)
				p.collectors = append(p.collectors, c)
				p.mu.Unlock()
				body.Res = &types.CreateCollectorForEventsResponse{
					Returnval: ctx.Session.Put(c).Reference()}
				return body
			}
			p.mu.Unlock()
		}
	}
	body.Fault_ = fault
	return body
}

func tail(list []*peerEntry, n int) []*peerEntry {
	if len(list) > n {
		list = list[len(list)-n:]
	}
	return append([]*peerEntry(nil), list...)
}

func (m *peerEventManager) QueryEvents(ctx *simulator.Context, req *types.QueryEvents) soap.HasFault {
	body := new(methods.QueryEventsBody)
	f, fault := m.p.compile(req.Filter)
	if fault != nil {
		body.Fault_ = fault
		return body
	}
	limit := int(req.Filter.MaxCount)
	if limit <= 0 {
		limit = queryLimit
	}
	m.p.mu.Lock()
	found := tail(m.p.matching(f), limit)
	m.p.mu.Unlock()
	body.Res = &types.QueryEventsResponse{Returnval: f.events(found, true)}
	return body
}

// --- the collector

type peerCollector struct {
	mo.EventHistoryCollector // first: the property collector finds the mo type here

	p        *peer
	filter   *peerFilter
	pageSize int
	session  string

	buf     []*peerEntry // the scrollable view, oldest first
	pos     int          // ReadNextEvents starts at buf[pos]
	histEnd int          // buf[:histEnd] was the history at creation; later posts follow
	latest []*peerEntry // the newest pageSize matching events, oldest first
	stale  bool
}

func (*peerCollector) Lock()   {}
func (*peerCollector) Unlock() {}

// add appends a matching event (peer.mu held).
func (c *peerCollector) add(en *peerEntry) {
	if c.pageSize > 0 {
		c.latest = append(c.latest, en)
		if len(c.latest) > c.pageSize {
			c.latest = c.latest[len(c.latest)-c.pageSize:]
		}
	}
	if c.stale {
		return
	}
	capacity := c.p.capacity
	if capacity > 0 && len(c.buf)-maxInt(c.pos, c.histEnd) >= capacity {
		// This post would put the collector more than `capacity` unread new events behind.
		c.stale = true
		c.buf, c.pos, c.histEnd = nil, 0, 0
		return
	}
	c.buf = append(c.buf, en)
	c.trimRead()
}

// trimRead keeps at most `capacity` events already read (what RewindCollector and
// ReadPreviousEvents can go back to) and drops older ones (peer.mu held).
func (c *peerCollector) trimRead() {
	if capacity := c.p.capacity; capacity > 0 && c.pos > capacity {
		drop := c.pos - capacity
		c.buf, c.pos = c.buf[drop:], c.pos-drop
		c.histEnd = maxInt(c.histEnd-drop, 0)
	}
}

func (c *peerCollector) Get() mo.Reference {
	c.p.mu.Lock()
	defer c.p.mu.Unlock()
	clone := c.EventHistoryCollector
	clone.LatestPage = c.filter.events(c.latest, true)
	return &clone
}

func badCount() *soap.Fault {
	return simulator.Fault("", &types.InvalidArgument{InvalidProperty: "maxCount"})
}

func (c *peerCollector) ReadNextEvents(ctx *simulator.Context, req *types.ReadNextEvents) soap.HasFault {
	body := new(methods.ReadNextEventsBody)
	if req.MaxCount <= 0 {
		body.Fault_ = badCount()
		return body
	}
	c.p.mu.Lock()
	end := c.pos + int(req.MaxCount)
	if end > len(c.buf) {
		end = len(c.buf)
	}
	page := c.buf[c.pos:end]
	c.pos = end
	c.trimRead()
	c.p.mu.Unlock()
	body.Res = &types.ReadNextEventsResponse{Returnval: c.filter.events(page, false)}
	return body
}

func (c *peerCollector) ReadPreviousEvents(ctx *simulator.Context, req *types.ReadPreviousEvents) soap.HasFault {
	body := new(methods.ReadPreviousEventsBody)
	if req.MaxCount <= 0 {
		body.Fault_ = badCount()
		return body
	}
	c.p.mu.Lock()
	start := c.pos - int(req.MaxCount)
	if start < 0 {
		start = 0
	}
	page := c.buf[start:c.pos]
	c.pos = start
	c.p.mu.Unlock()
	body.Res = &types.ReadPreviousEventsResponse{Returnval: c.filter.events(page, true)}
	return body
}

func (c *peerCollector) RewindCollector(ctx *simulator.Context, req *types.RewindCollector) soap.HasFault {
	c.p.mu.Lock()
	c.pos = 0
	c.p.mu.Unlock()
	return &methods.RewindCollectorBody{Res: new(types.RewindCollectorResponse)}
}

func (c *peerCollector) ResetCollector(ctx *simulator.Context, req *types.ResetCollector) soap.HasFault {
	c.p.mu.Lock()
	// Just before the latest page: the latest page is the newest matching events, which are
	// the tail of the buffer.
	c.pos = len(c.buf) - len(c.latest)
	if c.pos < 0 {
		c.pos = 0
	}
	c.p.mu.Unlock()
	return &methods.ResetCollectorBody{Res: new(types.ResetCollectorResponse)}
}

func (c *peerCollector) SetCollectorPageSize(ctx *simulator.Context, req *types.SetCollectorPageSize) soap.HasFault {
	body := new(methods.SetCollectorPageSizeBody)
	size, fault := validPageSize(req.MaxCount, 0)
	if fault != nil {
		body.Fault_ = fault
		return body
	}
	p := c.p
	p.mu.Lock()
	c.pageSize = size
	var latest []*peerEntry
	for i := len(p.log) - 1; i >= 0 && len(latest) < size; i-- {
		if c.filter.match(p, p.log[i]) {
			latest = append(latest, p.log[i])
		}
	}
	sort.Slice(latest, func(i, j int) bool { return latest[i].seq < latest[j].seq })
	c.latest = latest
	p.mu.Unlock()
	p.notify.broadcast()
	body.Res = new(types.SetCollectorPageSizeResponse)
	return body
}

func (c *peerCollector) DestroyCollector(ctx *simulator.Context, req *types.DestroyCollector) soap.HasFault {
	p := c.p
	p.mu.Lock()
	for i, x := range p.collectors {
		if x == c {
			p.collectors = append(p.collectors[:i:i], p.collectors[i+1:]...)
			break
		}
	}
	c.buf, c.latest, c.stale = nil, nil, true
	p.mu.Unlock()
	ctx.Session.Remove(req.This)
	simulator.Map.Remove(req.This) // tells property collectors (leave); frees its lock entry
	return &methods.DestroyCollectorBody{Res: new(types.DestroyCollectorResponse)}
}

// --- learning of posts: the registry handler

// notifier is registered as a registry handler: it sees every Map.Put/Update/Remove. It hands
// the tap's updates (one per PostEvent) to the peer, and wakes every waiting property collector.
type notifier struct {
	self ref
	p    *peer

	mu sync.Mutex
	ch chan struct{}
}

func (n *notifier) Reference() ref { return n.self }

func (n *notifier) PutObject(mo.Reference) { n.broadcast() }

func (n *notifier) RemoveObject(ref) { n.broadcast() }

func (n *notifier) UpdateObject(o mo.Reference, changes []types.PropertyChange) {
	if o.Reference() == n.p.tapRef {
		for _, c := range changes {
			if a, ok := c.Val.(*types.ArrayOfEvent); ok && len(a.Event) > 0 {
				n.p.post(a.Event[0])
				// Under the EventManager's lock (PostEvent holds it), as reads of it take it.
				simulator.Map.Update(n.p.em, []types.PropertyChange{{Name: "latestEvent", Val: a.Event[0]}})
			}
		}
	}
	n.broadcast()
}

// changed returns a channel closed at the next change anywhere in the inventory.
func (n *notifier) changed() <-chan struct{} {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.ch
}

func (n *notifier) broadcast() {
	n.mu.Lock()
	close(n.ch)
	n.ch = make(chan struct{})
	n.mu.Unlock()
}

func maxInt(a, b int) int {
	if a > b {
		return a
	}
	return b
}
