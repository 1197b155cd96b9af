"""The Lua scripts behind :class:`~kvtier.cluster.metadata.ClusterStore` (schema in docs/cluster.md).

Every script runs atomically in the server. Each takes the key prefix (``kvt:{<cluster>}:``) as
``ARGV[1]``; the ``{<cluster>}`` hash tag puts every key of one cluster in one Redis Cluster slot,
so the scripts may build key names (worker liveness keys, block entries) that they were not passed
in ``KEYS``. Arrays cross as packed little-endian strings (Redis's Lua has ``struct``), so a
lookup of N keys is one call with one argument, and its answer one string that numpy reads
without a per-block Python loop.

Layouts (all little-endian):
  block key        16 bytes: the key's two uint64 words (hi, lo) as kvtier stores them
  directory entry  24 bytes: incarnation u64 | slot u32 | generation u32 | checksum 8 bytes
  lookup record    24 bytes: key index u32 | worker index u32 | slot u32 | generation u32 | checksum
  publish record   28 bytes: key 16 | slot u32 | checksum 8
  validate record  28 bytes: key 16 | worker index u32 | slot u32 | generation u32

Errors are ``redis.error_reply`` strings starting with a code kvtier maps to an exception:
``KVT_STALE`` (the caller's incarnation is not the live one), ``KVT_OWNED`` (a live worker owns
the trace), ``KVT_FENCE`` (the fence is not the trace's current one), ``KVT_TARGET`` (the target
worker is not live), ``KVT_STATE`` (the trace is not in the state the call needs), ``KVT_NOTRACE``.
"""

from __future__ import annotations

# The next value of a counter that must grow across a store lost and restarted empty: a missing
# counter starts from the server's clock in microseconds (~1.7e15 < 2^53, exact in Lua numbers),
# so incarnations and fences issued by the new store are larger than any the old one issued
# (Note [Counters that survive a lost store] in docs/cluster.md).
_NEXT = """
local function next_counter(key)
  if redis.call('EXISTS', key) == 0 then
    local t = redis.call('TIME')
    redis.call('SET', key, tonumber(t[1]) * 1000000 + tonumber(t[2]))
  end
  return redis.call('INCR', key)
end
local function live_key(prefix, worker) return prefix .. 'w:' .. worker .. ':live' end
"""

# ARGV: prefix, worker, lease_ms, then info field/value pairs. Returns the new incarnation.
REGISTER = _NEXT + """
local prefix, worker, lease_ms = ARGV[1], ARGV[2], ARGV[3]
local inc = next_counter(prefix .. 'incarnation')
redis.call('SET', live_key(prefix, worker), inc, 'PX', lease_ms)
local info = prefix .. 'w:' .. worker .. ':info'
redis.call('DEL', info)
redis.call('HSET', info, 'incarnation', inc, unpack(ARGV, 4))
redis.call('PEXPIRE', info, lease_ms)
redis.call('SADD', prefix .. 'workers', worker)
return inc
"""

# ARGV: prefix, worker, incarnation, lease_ms. Returns 1 if renewed, 0 if the lease is gone or
# belongs to another incarnation (the caller must rejoin).
RENEW = _NEXT + """
local prefix, worker, inc, lease_ms = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local lk = live_key(prefix, worker)
if redis.call('GET', lk) ~= inc then return 0 end
redis.call('PEXPIRE', lk, lease_ms)
redis.call('PEXPIRE', prefix .. 'w:' .. worker .. ':info', lease_ms)
return 1
"""

# ARGV: prefix, worker, incarnation, then info field/value pairs.
UPDATE_INFO = _NEXT + """
local prefix, worker, inc = ARGV[1], ARGV[2], ARGV[3]
if redis.call('GET', live_key(prefix, worker)) ~= inc then
  return redis.error_reply('KVT_STALE worker ' .. worker .. ' incarnation ' .. inc .. ' is not live')
end
local info = prefix .. 'w:' .. worker .. ':info'
local ttl = redis.call('PTTL', info)
redis.call('HSET', info, unpack(ARGV, 4))
if ttl > 0 then redis.call('PEXPIRE', info, ttl) end
return 1
"""

# ARGV: prefix, worker, incarnation. Deletes the lease if it is still this incarnation's.
LEAVE = _NEXT + """
local prefix, worker, inc = ARGV[1], ARGV[2], ARGV[3]
local lk = live_key(prefix, worker)
if redis.call('GET', lk) ~= inc then return 0 end
redis.call('DEL', lk, prefix .. 'w:' .. worker .. ':info')
return 1
"""

# ARGV: prefix. Returns {worker, incarnation, info pairs...} for every live worker.
WORKERS = _NEXT + """
local prefix = ARGV[1]
local out = {}
for _, w in ipairs(redis.call('SMEMBERS', prefix .. 'workers')) do
  local inc = redis.call('GET', live_key(prefix, w))
  if inc then
    out[#out + 1] = {w, inc, redis.call('HGETALL', prefix .. 'w:' .. w .. ':info')}
  end
end
return out
"""

# ARGV: prefix, worker, incarnation, packed publish records. Returns the packed u32 generations.
PUBLISH = _NEXT + """
local prefix, worker, inc, blob = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if redis.call('GET', live_key(prefix, worker)) ~= inc then
  return redis.error_reply('KVT_STALE worker ' .. worker .. ' incarnation ' .. inc .. ' is not live')
end
local incp = struct.pack('<I8', tonumber(inc))
local slots_h = prefix .. 'w:' .. worker .. ':slots'
local gen_h = prefix .. 'w:' .. worker .. ':gen'
local gens = {}
for i = 1, #blob / 28 do
  local base = 28 * (i - 1)
  local k = string.sub(blob, base + 1, base + 16)
  local slot = struct.unpack('<I4', blob, base + 17)
  local ck = string.sub(blob, base + 21, base + 28)
  local bk = prefix .. 'b:' .. k
  -- the slot held another key (reused without a free): that key's entry goes if it points here
  local old = redis.call('HGET', slots_h, slot)
  if old and old ~= k then
    local obk = prefix .. 'b:' .. old
    local ov = redis.call('HGET', obk, worker)
    if ov and struct.unpack('<I4', ov, 9) == slot then redis.call('HDEL', obk, worker) end
  end
  -- this worker held the key at another slot: that slot's mapping goes (one entry per worker)
  local prev = redis.call('HGET', bk, worker)
  if prev then
    local ps = struct.unpack('<I4', prev, 9)
    if ps ~= slot and redis.call('HGET', slots_h, ps) == k then redis.call('HDEL', slots_h, ps) end
  end
  local g = redis.call('HINCRBY', gen_h, slot, 1)
  redis.call('HSET', slots_h, slot, k)
  redis.call('HSET', bk, worker, incp .. struct.pack('<I4I4', slot, g) .. ck)
  gens[i] = struct.pack('<I4', g)
end
return table.concat(gens)
"""

# ARGV: prefix, worker, incarnation, packed u32 slots. Removes this incarnation's entries of those
# slots and bumps each freed slot's generation. Returns how many entries went.
FREE_SLOTS = _NEXT + """
local prefix, worker, inc, blob = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local incp = struct.pack('<I8', tonumber(inc))
local slots_h = prefix .. 'w:' .. worker .. ':slots'
local gen_h = prefix .. 'w:' .. worker .. ':gen'
local freed = 0
for i = 1, #blob / 4 do
  local slot = struct.unpack('<I4', blob, 4 * (i - 1) + 1)
  local k = redis.call('HGET', slots_h, slot)
  if k then
    local bk = prefix .. 'b:' .. k
    local v = redis.call('HGET', bk, worker)
    if v and string.sub(v, 1, 8) == incp and struct.unpack('<I4', v, 9) == slot then
      redis.call('HDEL', bk, worker)
      redis.call('HDEL', slots_h, slot)
      redis.call('HINCRBY', gen_h, slot, 1)
      freed = freed + 1
    end
  end
end
return freed
"""

# ARGV: prefix, packed block keys. Returns {worker names, packed lookup records} for the live
# holders of every key, in key order.
LOOKUP = _NEXT + """
local prefix, blob = ARGV[1], ARGV[2]
local live, index, names, out = {}, {}, {}, {}
for i = 1, #blob / 16 do
  local h = redis.call('HGETALL', prefix .. 'b:' .. string.sub(blob, 16 * i - 15, 16 * i))
  for j = 1, #h, 2 do
    local w = h[j]
    local incp = live[w]
    if incp == nil then
      local inc = redis.call('GET', live_key(prefix, w))
      incp = inc and struct.pack('<I8', tonumber(inc)) or false
      live[w] = incp
    end
    local v = h[j + 1]
    if incp and string.sub(v, 1, 8) == incp then
      local wi = index[w]
      if not wi then
        names[#names + 1] = w
        wi = #names
        index[w] = wi
      end
      out[#out + 1] = struct.pack('<I4I4', i - 1, wi - 1) .. string.sub(v, 9)
    end
  end
end
return {names, table.concat(out)}
"""

# ARGV: prefix, packed validate records, then the worker names the records index. Returns one
# byte per record: 1 if the entry is still there, live, at that slot with that generation.
VALIDATE = _NEXT + """
local prefix, blob = ARGV[1], ARGV[2]
local live, out = {}, {}
for i = 1, #blob / 28 do
  local base = 28 * (i - 1)
  local k = string.sub(blob, base + 1, base + 16)
  local wi = struct.unpack('<I4', blob, base + 17)
  local w = ARGV[3 + wi]
  local incp = live[w]
  if incp == nil then
    local inc = redis.call('GET', live_key(prefix, w))
    incp = inc and struct.pack('<I8', tonumber(inc)) or false
    live[w] = incp
  end
  local ok = 0
  if incp then
    local v = redis.call('HGET', prefix .. 'b:' .. k, w)
    if v and string.sub(v, 1, 8) == incp and string.sub(v, 9, 16) == string.sub(blob, base + 21, base + 28) then
      ok = 1
    end
  end
  out[i] = string.char(ok)
end
return table.concat(out)
"""

# ARGV: prefix, worker, max entries. Garbage-collects one batch of the entries of a worker whose
# incarnation they do not match (dead, or rejoined). Returns {entries removed, cursor done 0/1}.
CLEANUP = _NEXT + """
local prefix, worker, budget = ARGV[1], ARGV[2], tonumber(ARGV[3])
local inc = redis.call('GET', live_key(prefix, worker))
local incp = inc and struct.pack('<I8', tonumber(inc)) or false
local slots_h = prefix .. 'w:' .. worker .. ':slots'
local cursor_k = prefix .. 'w:' .. worker .. ':gc'
local cursor = redis.call('GET', cursor_k) or '0'
local res = redis.call('HSCAN', slots_h, cursor, 'COUNT', budget)
local removed = 0
local kv = res[2]
for j = 1, #kv, 2 do
  local slot, k = kv[j], kv[j + 1]
  local bk = prefix .. 'b:' .. k
  local v = redis.call('HGET', bk, worker)
  if not v then
    redis.call('HDEL', slots_h, slot)
  elseif (not incp) or string.sub(v, 1, 8) ~= incp then
    redis.call('HDEL', bk, worker)
    redis.call('HDEL', slots_h, slot)
    removed = removed + 1
  end
end
if res[1] == '0' then
  redis.call('DEL', cursor_k)
  if not inc then
    if redis.call('HLEN', slots_h) == 0 then
      redis.call('DEL', slots_h, prefix .. 'w:' .. worker .. ':gen')
      redis.call('SREM', prefix .. 'workers', worker)
    end
  end
  return {removed, 1}
end
redis.call('SET', cursor_k, res[1])
return {removed, 0}
"""

# ---------------------------------------------------------------- trace ownership
# A trace record  t:<id>  is a hash: owner, inc (the owner's incarnation), fence, state
# (owned | moving), target (while moving), and d:<field> values the owner writes under its fence.

_TRACE = """
local function owner_live(prefix, rec_owner, rec_inc)
  return rec_owner and redis.call('GET', live_key(prefix, rec_owner)) == rec_inc
end
local function check_fence(prefix, tk, fence)
  local r = redis.call('HMGET', tk, 'owner', 'inc', 'fence', 'state', 'target')
  if not r[1] then return nil, redis.error_reply('KVT_NOTRACE no owner record') end
  if r[3] ~= fence then
    return nil, redis.error_reply('KVT_FENCE fence ' .. fence .. ' is stale (current ' .. r[3] .. ', owner ' .. r[1] .. ')')
  end
  if not owner_live(prefix, r[1], r[2]) then
    return nil, redis.error_reply('KVT_STALE owner ' .. r[1] .. ' incarnation ' .. r[2] .. ' is not live')
  end
  return r, nil
end
"""

# ARGV: prefix, trace id, worker, incarnation. Returns the fence (an existing one if this
# incarnation already owns the trace; a new one after taking a dead owner's trace).
CLAIM_TRACE = _NEXT + _TRACE + """
local prefix, tid, worker, inc = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if redis.call('GET', live_key(prefix, worker)) ~= inc then
  return redis.error_reply('KVT_STALE worker ' .. worker .. ' incarnation ' .. inc .. ' is not live')
end
local tk = prefix .. 't:' .. tid
local r = redis.call('HMGET', tk, 'owner', 'inc', 'fence')
if r[1] then
  if r[1] == worker and r[2] == inc then return tonumber(r[3]) end
  if owner_live(prefix, r[1], r[2]) then
    return redis.error_reply('KVT_OWNED trace ' .. tid .. ' is owned by live worker ' .. r[1])
  end
end
local fence = next_counter(prefix .. 'fence')
redis.call('HSET', tk, 'owner', worker, 'inc', inc, 'fence', fence, 'state', 'owned')
redis.call('HDEL', tk, 'target')
return fence
"""

# ARGV: prefix, trace id. Returns {owner, inc, fence, state, target, owner live 0/1} or nil.
TRACE_OWNER = _NEXT + _TRACE + """
local prefix, tid = ARGV[1], ARGV[2]
local r = redis.call('HMGET', prefix .. 't:' .. tid, 'owner', 'inc', 'fence', 'state', 'target')
if not r[1] then return nil end
return {r[1], r[2], r[3], r[4], r[5] or '', owner_live(prefix, r[1], r[2]) and 1 or 0}
"""

# ARGV: prefix, trace id, from, to, fence. Returns the new fence (the target's).
TRANSFER_TRACE = _NEXT + _TRACE + """
local prefix, tid, from, to, fence = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local tk = prefix .. 't:' .. tid
local r, err = check_fence(prefix, tk, fence)
if err then return err end
if r[1] ~= from then return redis.error_reply('KVT_FENCE trace ' .. tid .. ' is owned by ' .. r[1] .. ', not ' .. from) end
if r[4] == 'moving' and r[5] ~= to then
  return redis.error_reply('KVT_STATE trace ' .. tid .. ' is moving to ' .. r[5] .. ', not ' .. to)
end
local to_inc = redis.call('GET', live_key(prefix, to))
if not to_inc then return redis.error_reply('KVT_TARGET worker ' .. to .. ' is not live') end
local nf = next_counter(prefix .. 'fence')
redis.call('HSET', tk, 'owner', to, 'inc', to_inc, 'fence', nf, 'state', 'owned')
redis.call('HDEL', tk, 'target')
return nf
"""

# ARGV: prefix, trace id, to, fence. The owner stays; the record says where the trace is going.
BEGIN_MOVE = _NEXT + _TRACE + """
local prefix, tid, to, fence = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local tk = prefix .. 't:' .. tid
local r, err = check_fence(prefix, tk, fence)
if err then return err end
if r[1] == to then return redis.error_reply('KVT_STATE trace ' .. tid .. ' is already owned by ' .. to) end
if r[4] == 'moving' then return redis.error_reply('KVT_STATE trace ' .. tid .. ' is already moving to ' .. r[5]) end
if not redis.call('GET', live_key(prefix, to)) then
  return redis.error_reply('KVT_TARGET worker ' .. to .. ' is not live')
end
redis.call('HSET', tk, 'state', 'moving', 'target', to)
return 1
"""

# ARGV: prefix, trace id, fence. Back to owned by the same owner (idempotent).
ABORT_MOVE = _NEXT + _TRACE + """
local prefix, tid, fence = ARGV[1], ARGV[2], ARGV[3]
local tk = prefix .. 't:' .. tid
local r, err = check_fence(prefix, tk, fence)
if err then return err end
redis.call('HSET', tk, 'state', 'owned')
redis.call('HDEL', tk, 'target')
return 1
"""

# ARGV: prefix, trace id, fence, field/value pairs (stored as d:<field>).
WRITE_TRACE = _NEXT + _TRACE + """
local prefix, tid, fence = ARGV[1], ARGV[2], ARGV[3]
local tk = prefix .. 't:' .. tid
local r, err = check_fence(prefix, tk, fence)
if err then return err end
for i = 4, #ARGV, 2 do redis.call('HSET', tk, 'd:' .. ARGV[i], ARGV[i + 1]) end
return 1
"""

# ARGV: prefix, trace id, fence. Deletes the record.
RELEASE_TRACE = _NEXT + _TRACE + """
local prefix, tid, fence = ARGV[1], ARGV[2], ARGV[3]
local tk = prefix .. 't:' .. tid
local r, err = check_fence(prefix, tk, fence)
if err then return err end
redis.call('DEL', tk)
return 1
"""
