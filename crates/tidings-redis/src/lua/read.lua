-- A history read with the channel's top taken in the same atomic step.
-- KEYS[1] meta hash, KEYS[2] stream.
-- ARGV[1] candidate epoch, ARGV[2] history ttl (ms), ARGV[3] meta ttl (ms)
-- ARGV[4] mode: 'now' | 'last' | 'after'
-- ARGV[5] how many (last) or the position's offset (after), ARGV[6] the position's epoch
-- ARGV[7] at most this many entries, ARGV[8] history size
-- ARGV[9], ARGV[10] the highest position of the channel the calling node has seen (see
-- regressed() in common.lua; a client's cursor is not trusted for this: anyone can forge one)
-- Returns {epoch, top, gap reason ('' | 'trimmed' | 'epoch_changed'), first kept offset, entries}.
local meta, stream = KEYS[1], KEYS[2]
local known = redis.call('HMGET', meta, 'e', 'o')
if known[1] and regressed(known[1], known[2], ARGV[9], ARGV[10]) then
  redis.call('DEL', meta)
end
local epoch = epoch_of(meta, stream, ARGV[1])
-- Reading is use: an idle channel keeps its epoch while someone reads it.
redis.call('PEXPIRE', meta, tonumber(ARGV[3]))
trim_expired(stream, now_ms() - tonumber(ARGV[2]))
local top = tonumber(redis.call('HGET', meta, 'o'))
local first = top + 1
local head = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
if #head > 0 then
  first = id_offset(head[1][1])
end
-- Entries that approximate trimming (publish.lua) kept beyond the size are not history.
first = math.max(first, top - tonumber(ARGV[8]) + 1)
local mode, limit = ARGV[4], tonumber(ARGV[7])
if mode == 'now' or limit <= 0 then
  return {epoch, top, '', first, {}}
end
if mode == 'last' then
  local n = math.min(tonumber(ARGV[5]), limit)
  if n <= 0 then
    return {epoch, top, '', first, {}}
  end
  local newest = redis.call('XREVRANGE', stream, '+', int(first), 'COUNT', int(n))
  local entries = {}
  for i = #newest, 1, -1 do
    entries[#entries + 1] = newest[i]
  end
  return {epoch, top, '', first, entries}
end
local at = tonumber(ARGV[5])
local reason, start = '', at + 1
if ARGV[6] ~= epoch or at > top then
  -- Another incarnation's cursor (or one ahead of this stream, which only another
  -- incarnation could have produced): start over at what is kept.
  reason, start = 'epoch_changed', first
elseif at + 1 < first then
  reason, start = 'trimmed', first
end
return {epoch, top, reason, first, redis.call('XRANGE', stream, int(start), '+', 'COUNT', int(limit))}
