// JDBC through pgshard: concurrent clients with server-side prepared statements
// (prepareThreshold=1), batches and transactions, over a pool smaller than the client count.
import java.sql.*;
import java.util.*;
import java.util.concurrent.*;

public class JdbcTest {
    public static void main(String[] args) throws Exception {
        String url = args[0];
        Properties p = new Properties();
        p.setProperty("user", args[1]);
        p.setProperty("password", args[2]);
        p.setProperty("prepareThreshold", "1");
        try (Connection c = DriverManager.getConnection(url, p); Statement s = c.createStatement()) {
            s.execute("drop table if exists jdbc_t");
            s.execute("create table jdbc_t(client int, v int)");
        }
        int clients = 16, rounds = 100;
        ExecutorService ex = Executors.newFixedThreadPool(clients);
        List<Future<String>> results = new ArrayList<>();
        for (int n = 0; n < clients; n++) {
            final int id = n;
            results.add(ex.submit(() -> {
                try (Connection c = DriverManager.getConnection(url, p)) {
                    try (PreparedStatement ps = c.prepareStatement("select ?::int + ?::int")) {
                        for (int i = 0; i < rounds; i++) {
                            ps.setInt(1, i);
                            ps.setInt(2, id);
                            try (ResultSet rs = ps.executeQuery()) {
                                rs.next();
                                if (rs.getInt(1) != i + id) return "client " + id + ": wrong sum " + rs.getInt(1);
                            }
                        }
                    }
                    c.setAutoCommit(false);
                    try (PreparedStatement ins = c.prepareStatement("insert into jdbc_t(client, v) values (?, ?)")) {
                        for (int k = 0; k < 20; k++) {
                            ins.setInt(1, id);
                            ins.setInt(2, k);
                            ins.addBatch();
                        }
                        ins.executeBatch();
                    }
                    c.commit();
                    c.setAutoCommit(true);
                    try (PreparedStatement q = c.prepareStatement("select count(*) from jdbc_t where client = ?")) {
                        q.setInt(1, id);
                        try (ResultSet rs = q.executeQuery()) {
                            rs.next();
                            if (rs.getInt(1) != 20) return "client " + id + ": expected 20 rows, saw " + rs.getInt(1);
                        }
                    }
                    return null;
                } catch (Exception e) {
                    return "client " + id + ": " + e;
                }
            }));
        }
        int failed = 0;
        for (Future<String> f : results) {
            String r = f.get();
            if (r != null) {
                System.out.println("FAIL: " + r);
                failed++;
            }
        }
        ex.shutdown();
        if (failed > 0) System.exit(1);
        System.out.println("OK jdbc: " + clients + " clients x " + rounds + " rounds with prepareThreshold=1");
    }
}
