-- Prepended to every script (see scripts.rs). Stream entry IDs are "<offset>-<time ms>":
-- offsets order the stream, and times never decrease along it (publish.lua keeps them
-- monotonic), which is what lets trim_expired find the expired prefix by binary search.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Lua numbers are doubles: '%d' keeps big integers out of tostring's exponent notation.
local function int(n)
  return string.format('%d', n)
end

local function id_offset(id)
  return tonumber(string.match(id, '^(%d+)-'))
end

local function id_time(id)
  return tonumber(string.match(id, '-(%d+)$'))
end

-- Drops the entries older than `cutoff` (ms). They are a prefix of the stream: look at the
-- first few, then binary-search by offset, then cut once with XTRIM MINID. Every entry is
-- cut once, so the work is amortised over the publishes that added them.
local function trim_expired(stream, cutoff)
  local oldest = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1]
  if not oldest or id_time(oldest[1]) >= cutoff then
    return
  end
  local head = redis.call('XRANGE', stream, '-', '+', 'COUNT', 8)
  for i = 2, #head do
    if id_time(head[i][1]) >= cutoff then
      redis.call('XTRIM', stream, 'MINID', int(id_offset(head[i][1])))
      return
    end
  end
  local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1]
  if id_time(last[1]) < cutoff then
    redis.call('DEL', stream)
    return
  end
  -- Invariant: every entry at an offset <= lo has expired, none at an offset >= hi has.
  local lo = id_offset(head[#head][1])
  local hi = id_offset(last[1])
  while hi - lo > 1 do
    local mid = lo + math.floor((hi - lo) / 2)
    local e = redis.call('XRANGE', stream, int(mid), '+', 'COUNT', 1)[1]
    if id_time(e[1]) >= cutoff then
      hi = mid
    else
      lo = id_offset(e[1])
    end
  end
  redis.call('XTRIM', stream, 'MINID', int(hi))
end

-- The channel's epoch, starting a new incarnation when the meta hash is gone (expired,
-- evicted, or Redis lost its data): whatever stream is left belonged to the old one.
local function epoch_of(meta, stream, candidate)
  local epoch = redis.call('HGET', meta, 'e')
  if not epoch then
    epoch = candidate
    redis.call('DEL', stream)
    redis.call('HSET', meta, 'e', epoch, 'o', 0, 't', 0)
  end
  return epoch
end

-- Whether Redis holds fewer messages of `epoch` than a node has seen (`seen_epoch`,
-- `seen_offset`): Redis came back from an older copy of its data (a snapshot, an AOF that
-- missed its last writes, a replica behind its master). Continuing would give offsets that
-- were already acknowledged to other messages, so the caller starts a new incarnation.
local function regressed(epoch, top, seen_epoch, seen_offset)
  return seen_epoch ~= '' and seen_epoch == epoch and tonumber(top) < tonumber(seen_offset)
end
