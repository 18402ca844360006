-- The CRUD mix of crud_mix.py for Debian's wrk (LuaJIT). crud_mix.py runs it as
--   wrk -t N -c N -s crud_mix.lua URL -- TEMPLATES.lua VARIANT RUN
-- With one connection per thread, request() and response() strictly alternate, so each
-- thread walks one iteration step by step: create the nine resources, read them, update them,
-- then delete them in reverse order (variant "delete") or search each by identifier ("search").
-- Checks are lighter than the asyncio loader's: status codes, ETags and ids.
-- Every request carries the Authorization header that TEMPLATES.lua holds (the access token
-- crud_mix.py took for the run).
-- done() prints "CRUDMIX ..." lines that crud_mix.py reads.
-- A thread's figures reach done() as one string: wrk's thread:get() mishandles nested tables.

local ffi = require("ffi")
ffi.cdef([[
typedef struct { long tv_sec; long tv_nsec; } crud_mix_timespec;
int clock_gettime(int clock, crud_mix_timespec *ts);
]])
local clock = ffi.new("crud_mix_timespec")
local CLOCK_MONOTONIC = 1

local function now_us()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, clock)
  return tonumber(clock.tv_sec) * 1e6 + tonumber(clock.tv_nsec) / 1e3
end

-- Latencies go into 0.1 ms buckets: enough for percentiles, cheap to merge.
local BUCKET_US = 100
local OPS = { "create", "read", "update", "delete", "search" }

-- main state: the threads, to collect their figures in done()
local threads = {}

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

-- thread state
local templates, variant, run
local steps = {}
local step, iteration, key, ids
local pending, started
local answers = 0
local headers_get, headers_body
local stats = {}
local samples = {}

-- "op n errors" lines, "op bucket count h" lines, then "! sample" lines.
local function report()
  local out = {}
  for op, s in pairs(stats) do
    table.insert(out, op .. " " .. s.n .. " " .. s.errors)
    for b, count in pairs(s.hist) do table.insert(out, op .. " " .. b .. " " .. count .. " h") end
  end
  for _, sample in ipairs(samples) do table.insert(out, "! " .. sample:gsub("\n", " ")) end
  return table.concat(out, "\n")
end

-- thread:get("report") reads a global: compute it only then, from this thread's state.
setmetatable(_G, { __index = function(_, name)
  if name == "report" then return report() end
end })

local function new_iteration()
  iteration = iteration + 1
  key = run .. "-" .. tid .. "-" .. iteration
  ids = { KEY = key }
  step = 1
end

function init(args)
  templates = dofile(args[1])
  variant = args[2]
  run = args[3]
  headers_get = { ["Accept"] = "application/fhir+json", ["Authorization"] = templates.authorization }
  headers_body = {
    ["Accept"] = "application/fhir+json",
    ["Content-Type"] = "application/fhir+json",
    ["Authorization"] = templates.authorization,
  }
  for _, op in ipairs(OPS) do
    stats[op] = { n = 0, errors = 0, hist = {} }
  end
  local order = templates.order
  for _, rtype in ipairs(order) do table.insert(steps, { op = "create", rtype = rtype }) end
  for _, rtype in ipairs(order) do table.insert(steps, { op = "read", rtype = rtype }) end
  for _, rtype in ipairs(order) do table.insert(steps, { op = "update", rtype = rtype }) end
  for i = 1, #order do
    if variant == "delete" then
      table.insert(steps, { op = "delete", rtype = order[#order - i + 1] })
    else
      table.insert(steps, { op = "search", rtype = order[i] })
    end
  end
  iteration = 0
  new_iteration()
end

local function fill(template, rtype)
  return (template:gsub("@@(%w+)@@", function(name)
    if name == "ID" then return ids[rtype] end
    return ids[name]
  end))
end

local function record(op, us, ok, detail)
  local s = stats[op]
  if ok then
    s.n = s.n + 1
    local b = math.floor(us / BUCKET_US)
    s.hist[b] = (s.hist[b] or 0) + 1
  else
    s.errors = s.errors + 1
    if #samples < 5 then table.insert(samples, op .. ": " .. detail) end
  end
end

local function advance()
  step = step + 1
  if step > #steps then new_iteration() end
end

function request()
  if pending and answers > 0 then
    -- The connection was replaced before an answer came (timeout or reset): start over.
    record(pending.op, 0, false, pending.rtype .. " no answer")
    new_iteration()
  end
  -- (Before any answer, a pending request is the one wrk builds to verify the script and
  -- never sends: it is simply built again.)
  local s = steps[step]
  local path = "/fhir/" .. s.rtype
  local req
  if s.op == "create" then
    req = wrk.format("POST", path, headers_body, fill(templates.create[s.rtype], s.rtype))
  elseif s.op == "update" then
    req = wrk.format("PUT", path .. "/" .. ids[s.rtype], headers_body,
      fill(templates.update[s.rtype], s.rtype))
  elseif s.op == "delete" then
    req = wrk.format("DELETE", path .. "/" .. ids[s.rtype], headers_get)
  elseif s.op == "search" then
    req = wrk.format("GET", path .. "?" .. templates.search_prefix .. key, headers_get)
  else
    req = wrk.format("GET", path .. "/" .. ids[s.rtype], headers_get)
  end
  pending = s
  started = now_us()
  return req
end

local function check(s, status, headers, body)
  local id = ids[s.rtype]
  if s.op == "create" then
    if status ~= 201 then return false end
    local location = headers["location"] or headers["Location"] or ""
    id = location:match("/" .. s.rtype .. "/([^/]+)/_history/1$")
    if not id then return false end
    ids[s.rtype] = id
    return body:find(key, 1, true) ~= nil
  elseif s.op == "read" then
    return status == 200 and (headers["etag"] or headers["ETag"]) == 'W/"1"'
      and body:find('"id":"' .. id .. '"', 1, true) ~= nil
  elseif s.op == "update" then
    return status == 200 and (headers["etag"] or headers["ETag"]) == 'W/"2"'
  elseif s.op == "delete" then
    return status == 200 or status == 204
  end
  return status == 200 and body:find('"total":1[,}]') ~= nil
    and body:find('"id":"' .. id .. '"', 1, true) ~= nil
end

function response(status, headers, body)
  local s = pending
  if not s then return end
  pending = nil
  answers = answers + 1
  local us = now_us() - started
  local ok = check(s, status, headers, body)
  record(s.op, us, ok, s.rtype .. " " .. status .. " " .. body:sub(1, 160))
  if not ok and s.op == "create" then
    new_iteration()
  else
    advance()
  end
end

local function percentile(hist, total, p)
  local rank = math.max(1, math.floor(p * total + 0.5))
  local seen = 0
  local buckets = {}
  for b in pairs(hist) do table.insert(buckets, b) end
  table.sort(buckets)
  for _, b in ipairs(buckets) do
    seen = seen + hist[b]
    if seen >= rank then return (b + 0.5) * BUCKET_US / 1000 end
  end
  return 0
end

local function line(name, s)
  local maximum = 0
  for b in pairs(s.hist) do maximum = math.max(maximum, (b + 1) * BUCKET_US / 1000) end
  io.write(string.format("CRUDMIX %s n=%d errors=%d p50=%.2f p95=%.2f p99=%.2f max=%.2f\n",
    name, s.n, s.errors, percentile(s.hist, s.n, 0.50), percentile(s.hist, s.n, 0.95),
    percentile(s.hist, s.n, 0.99), maximum))
end

function done(summary, latency, requests)
  local merged = {}
  local all = { n = 0, errors = 0, hist = {} }
  for _, op in ipairs(OPS) do merged[op] = { n = 0, errors = 0, hist = {} } end
  local errors = {}
  for _, thread in ipairs(threads) do
    for text in (thread:get("report") .. "\n"):gmatch("([^\n]*)\n") do
      local sample = text:match("^! (.*)$")
      local op, a, b, h = text:match("^(%w+) (%d+) (%d+)( ?h?)$")
      if sample then
        if #errors < 8 then table.insert(errors, sample) end
      elseif op and h == " h" then
        local bucket, count = tonumber(a), tonumber(b)
        merged[op].hist[bucket] = (merged[op].hist[bucket] or 0) + count
        all.hist[bucket] = (all.hist[bucket] or 0) + count
      elseif op then
        merged[op].n = merged[op].n + tonumber(a)
        merged[op].errors = merged[op].errors + tonumber(b)
        all.n = all.n + tonumber(a)
        all.errors = all.errors + tonumber(b)
      end
    end
  end
  for _, op in ipairs(OPS) do
    if merged[op].n + merged[op].errors > 0 then line(op, merged[op]) end
  end
  line("all", all)
  local e = summary.errors
  io.write(string.format("CRUDMIX summary duration_us=%d requests=%d socket_errors=%d\n",
    summary.duration, summary.requests, e.connect + e.read + e.write + e.timeout))
  for _, sample in ipairs(errors) do io.write("CRUDMIX error " .. sample .. "\n") end
end
